"""Registry membership of a node: heartbeats to the managers (built-in registry), or the
Consul node list and service (`ConsulMembership`, registry backend consul).

Built-in registry:

At start the node POSTs a Heartbeat to <manager>/api/v1/nodes/heartbeat with the access
token, then one every `registry.heartbeat_interval` seconds; the manager marks a node offline
after `registry.offline_after_missed` missed beats. The managers are those of `node.managers`
(or manager.ip:port) and the ones alive on their database, which each answer names
(`ManagerPool`): a beat goes to the one that answered last, and on to the next when it does
not answer. Any one taking it is enough: managers share the database, so the node stays
online for all. The address advertised is node.ip:node.port from the config: explicit, never
guessed from the network.

While no manager answers the node goes on running its jobs and keeps beating; a failure is
logged once per outage (not once per attempt), and the return is logged with how long it
took. A node that stops cleanly says so first (`leaving()`: a beat with state leaving, and
the managers route no new run to it), beats on while it finishes its runs, and says offline
last (`leave()`).

Consul registry: see `ConsulMembership`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import httpx

from ays_runtime import __version__
from ays_runtime.auth import auth_headers
from ays_runtime.config import ConsulRegistrySettings, EnvConfig
from ays_runtime.exceptions import ConfigError, RegistryError
from ays_runtime.node.managers import ManagerPool
from ays_runtime.protocol import API, Heartbeat, HeartbeatAnswer
from ays_runtime.retry import Backoff

log = logging.getLogger("ays.node.membership")


def http_host(ip: str) -> str:
    """`ip` as the host part of a URL or an address (IPv6 in brackets)."""
    return f"[{ip}]" if ":" in ip else ip


@dataclass(frozen=True)
class MembershipStatus:
    """A node's registration as it stands (the node's health route and `aysNode status`
    show it). Times are aware UTC."""

    registry: Literal["builtin", "consul"]
    target: str  # the manager's heartbeat URL, or the Consul agent
    state: Literal["joining", "joined", "failing", "left"]
    last_ok_at: datetime | None  # the last beat the manager took / registration confirmed
    failing_since: datetime | None  # when the current run of failures began
    last_error: str  # why the last try failed; "" when it succeeded


class Attempts:
    """The outcome of a membership's tries so far, as `MembershipStatus` reports it."""

    def __init__(self) -> None:
        self.last_ok_at: datetime | None = None
        self.failing_since: datetime | None = None
        self.last_error = ""
        self.left = False

    def succeeded(self) -> None:
        self.last_ok_at = datetime.now(UTC)
        self.failing_since = None
        self.last_error = ""

    def failed(self, why: str) -> None:
        if self.failing_since is None:
            self.failing_since = datetime.now(UTC)
        self.last_error = why

    def status(self, registry: Literal["builtin", "consul"], target: str) -> MembershipStatus:
        state: Literal["joining", "joined", "failing", "left"]
        if self.left:
            state = "left"
        elif self.last_error:
            state = "failing"
        elif self.last_ok_at is not None:
            state = "joined"
        else:
            state = "joining"
        return MembershipStatus(
            registry, target, state, self.last_ok_at, self.failing_since, self.last_error
        )


class NodeMembership(Protocol):
    """What the daemon does with a membership: run it in the background from startup; at a
    clean stop, `leaving()` first (before the drain) and `leave()` once at the end (after the
    runs are drained and reported, the background run cancelled).

    `leaving()` tells the registry the node takes no new runs, when the registry has a way
    to say so without the node's runs being taken for lost; True when it was told (the
    daemon then gives the managers a moment to stop routing to it before it refuses jobs).

    `status()` answers at once, from memory, how the registration stands: `joining` until
    the first try is answered, `joined` while the last try succeeded (the manager took the
    beat; Consul has the service), `failing` while it does not (with the first failure's
    time and the last error), `left` after `leave()`."""

    async def run(self) -> None: ...

    async def leaving(self) -> bool: ...

    async def leave(self) -> None: ...

    def status(self) -> MembershipStatus: ...


class Membership:
    """Beats to the managers until cancelled. `beat` builds each Heartbeat (it carries the
    node's current load and state); `on_return` is called when a manager answers again after
    an outage (the node uses it to resend kept results at once)."""

    def __init__(
        self,
        who: str,
        managers: ManagerPool,
        interval: float,
        client: httpx.AsyncClient,
        token: str,
        beat: Callable[[], Heartbeat],
        on_return: Callable[[], None] | None = None,
    ) -> None:
        self.who = who
        self.managers = managers
        self.interval = interval
        self._client = client
        self._token = token
        self._beat = beat
        self._on_return = on_return
        self._timeout = httpx.Timeout(min(5.0, max(interval, 1.0)))
        self.joined = False  # a manager has taken at least one beat
        self._down_since: float | None = None
        self._attempts = Attempts()
        self._one_at_a_time = asyncio.Lock()

    @classmethod
    def for_config(
        cls,
        config: EnvConfig,
        who: str,
        managers: ManagerPool,
        client: httpx.AsyncClient,
        token: str,
        beat: Callable[[], Heartbeat],
        on_return: Callable[[], None] | None = None,
    ) -> NodeMembership:
        """The membership for the env's registry backend."""
        if config.registry.backend == "consul":
            return ConsulMembership(config, config.registry, who)
        return cls(
            who,
            managers,
            config.registry.heartbeat_interval,
            client,
            token,
            beat,
            on_return,
        )

    @property
    def url(self) -> str:
        """The heartbeat URL of the manager that answered last."""
        return _heartbeat_url(self.managers.current)

    async def run(self) -> None:
        """Beat now, then every `interval` seconds, until cancelled."""
        while True:
            started = time.monotonic()
            await self.beat_once()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def leaving(self) -> bool:
        """One beat now (the caller's beats say leaving from now on)."""
        return await self.beat_once()

    async def leave(self) -> None:
        """The last beat (it says offline, or still leaving when results wait to be sent:
        the managers then mark the node offline when its beats stop)."""
        await self.beat_once()
        self._attempts.left = True

    def status(self) -> MembershipStatus:
        return self._attempts.status("builtin", self.url)

    async def beat_once(self) -> bool:
        """Send one heartbeat, to the managers in turn until one takes it; True when one
        did. One at a time: a beat built before the node began leaving never lands after
        the one that says so."""
        async with self._one_at_a_time:
            return await self._beat_once()

    async def _beat_once(self) -> bool:
        heartbeat = self._beat()
        before = self.managers.current
        failures: list[str] = []
        reasons: list[str] = []
        for base in self.managers.order():
            why = await self._post(base, heartbeat)
            if not why:
                break
            self.managers.failed(base)
            failures.append(f"{_heartbeat_url(base)}: {why}")
            reasons.append(why)
        else:  # one manager: its reason alone (the URL is the target already)
            return self._failed(reasons[0] if len(reasons) == 1 else "; ".join(failures))
        self._attempts.succeeded()
        if failures and self.managers.current != before and self.joined:
            log.warning("%s: heartbeats go to %s now (%s)", self.who, self.url, "; ".join(failures))
        if self._down_since is not None:
            away = time.monotonic() - self._down_since
            self._down_since = None
            log.info("%s: heartbeats reach %s again after %.1fs", self.who, self.url, away)
            if self._on_return is not None:
                self._on_return()
        if not self.joined:
            self.joined = True
            log.info("%s: joined node group %s at %s", self.who, heartbeat.node_group, self.url)
        return True

    def _failed(self, why: str) -> bool:
        self._attempts.failed(why)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "%s: heartbeat to %s failed: %s; retrying every %gs, jobs keep running",
                self.who,
                "any manager" if len(self.managers.urls()) > 1 else "the manager",
                why,
                self.interval,
            )
        else:
            log.debug("%s: heartbeat failed again: %s", self.who, why)
        return False

    async def _post(self, base: str, heartbeat: Heartbeat) -> str:
        """'' when the manager at `base` took the beat (it is then the one to use), else
        why not."""
        try:
            response = await self._client.post(
                _heartbeat_url(base),
                json=heartbeat.model_dump(mode="json"),
                headers=auth_headers(self._token),
                timeout=self._timeout,
            )
        except httpx.HTTPError as err:
            return f"{type(err).__name__}: {err}" if str(err) else repr(err)
        if 200 <= response.status_code <= 299:
            self.managers.succeeded(base)
            self._learn(response)
            return ""
        why = f"HTTP {response.status_code}"
        if response.status_code == 401:
            why += " (the manager does not accept this node's cluster_secret)"
        return why

    def _learn(self, response: httpx.Response) -> None:
        """The managers alive beside the one that answered (a manager of an older version
        names none)."""
        try:
            answer = HeartbeatAnswer.model_validate_json(response.content)
        except ValueError:
            return
        if answer.managers:
            self.managers.learn(answer.managers)


def _heartbeat_url(base: str) -> str:
    return f"{base}{API}/nodes/heartbeat"


# How often a registered node asks its Consul agent whether it still has the service (an
# agent that lost its state, or reaped the service after a long partition, has not).
VERIFY_INTERVAL = 30.0
LEAVE_TIMEOUT = 10.0  # the deregistration at a clean stop gives up after this


class ConsulMembership:
    """A node's place in Consul: its entry in the KV node list and its service.

    `run()`: add the node to `<kv_prefix>/nodelist` (check-and-set: no duplicate, no lost
    entry when nodes start together), register the service `<service_name>` (ID unique per
    ip:port, tagged with the node group, Meta version and node_group) with an HTTP check on
    the node's /api/v1/health; then every VERIFY_INTERVAL make sure the agent still has it,
    and if not, list and register again. While Consul cannot be reached the node runs its jobs
    as usual, retries with backoff and says so once. `leave()`, at a clean stop: deregister
    the service, and leave the node list too when `registry.leave_nodelist_on_stop` is set.
    """

    def __init__(self, config: EnvConfig, settings: ConsulRegistrySettings, who: str) -> None:
        try:
            from ays_runtime.registry import consul as backend
        except ImportError as err:
            raise ConfigError(
                f"env {config.env}: registry backend consul needs py-consul ({err}); "
                "install it with pip install 'ays[consul]'"
            ) from None
        if not config.node.group:
            raise ConfigError("node.group is not set: give the node group with -g GROUP")
        self._backend: Any = backend
        self.settings = settings
        self.who = who
        self.ip = config.node.ip
        self.port = config.node.port
        self.group = config.node.group
        self.key = backend.nodelist_key(settings)
        self.service_id = backend.service_id(settings, self.ip, self.port)
        self.check_url = f"http://{http_host(self.ip)}:{self.port}{API}/health"
        self.where = f"consul {settings.scheme}://{http_host(settings.host)}:{settings.port}"
        self._listed = False
        self._registered = False
        self._left = False
        self._lock = threading.Lock()  # a registration never lands after the deregistration
        self._down_since: float | None = None
        self._attempts = Attempts()

    def status(self) -> MembershipStatus:
        return self._attempts.status("consul", self.where.removeprefix("consul "))

    async def leaving(self) -> bool:
        """Nothing yet: the service stays registered while the runs drain (a deregistered
        node is a lost node to the managers, and its runs would be retried elsewhere);
        `leave()` deregisters it."""
        return False

    async def run(self) -> None:
        backoff = Backoff(first=1.0, cap=30.0)
        while True:
            try:
                await asyncio.to_thread(self._join)
            except RegistryError as err:
                self._attempts.failed(str(err))
                delay = backoff.next()
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning(
                        "%s: cannot join the registry: %s; retrying (up to every %gs), jobs "
                        "keep running",
                        self.who,
                        err,
                        backoff.cap,
                    )
                else:
                    log.debug("%s: registry still failing: %s", self.who, err)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self._attempts.succeeded()
            if self._down_since is not None:
                away = time.monotonic() - self._down_since
                self._down_since = None
                log.info("%s: %s answers again after %.1fs", self.who, self.where, away)
            await asyncio.sleep(VERIFY_INTERVAL)

    def _join(self) -> None:
        backend = self._backend
        with self._lock, backend.ConsulClient(self.settings) as client:
            if self._left:
                return
            if self._registered and client.service_registered(self.service_id):
                return
            if self._registered:
                log.warning(
                    "%s: %s no longer has service %s: joining again",
                    self.who,
                    self.where,
                    self.service_id,
                )
                self._listed = self._registered = False
            if not self._listed:
                entry = backend.NodeEntry(
                    ip=self.ip, port=self.port, node_group=self.group, source="self"
                )
                added = backend.add_to_nodelist(client, self.key, entry)
                self._listed = True
                log.info(
                    "%s: %s node list %s",
                    self.who,
                    "joined the" if added else "already in the",
                    self.key,
                )
            client.register_service(
                self.service_id, self.ip, self.port, self.group, __version__, self.check_url
            )
            self._registered = True
            log.info(
                "%s: registered service %s (%s) with %s, checked at %s every %gs",
                self.who,
                self.service_id,
                self.settings.service_name,
                self.where,
                self.check_url,
                self.settings.check_interval,
            )

    async def leave(self) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(self._leave), LEAVE_TIMEOUT)
        except (RegistryError, TimeoutError) as err:
            log.warning(
                "%s: could not leave the registry (%s); Consul reaps the service %gs after "
                "its check fails",
                self.who,
                err or "timed out",
                self.settings.deregister_after,
            )

    def _leave(self) -> None:
        backend = self._backend
        with self._lock, backend.ConsulClient(self.settings) as client:
            self._left = self._attempts.left = True
            # Whether or not this process registered it: a killed predecessor may have.
            client.deregister_service(self.service_id)
            log.info("%s: deregistered service %s", self.who, self.service_id)
            if self.settings.leave_nodelist_on_stop:
                backend.remove_from_nodelist(client, self.key, self.ip, self.port)
                log.info("%s: left the node list %s", self.who, self.key)
