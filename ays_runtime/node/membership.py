"""Registry membership of a node, built-in registry: heartbeats to the manager.

At start the node POSTs a Heartbeat to http://<manager.ip>:<manager.port>/api/v1/nodes/heartbeat
with the access token, then one every `registry.heartbeat_interval` seconds; the manager marks
a node offline after `registry.offline_after_missed` missed beats. The address advertised is
node.ip:node.port from the config: explicit, never guessed from the network.

While the manager is away the node goes on running its jobs and keeps beating; a failure is
logged once per outage (not once per attempt), and the return is logged with how long it took.
With the Consul registry this module does nothing: the Consul registration lives elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx

from ays_runtime.auth import auth_headers
from ays_runtime.config import EnvConfig
from ays_runtime.protocol import API, Heartbeat

log = logging.getLogger("ays.node.membership")


def http_host(ip: str) -> str:
    """`ip` as the host part of a URL or an address (IPv6 in brackets)."""
    return f"[{ip}]" if ":" in ip else ip


def manager_url(config: EnvConfig) -> str:
    return f"http://{http_host(config.manager.ip)}:{config.manager.port}"


class Membership:
    """Beats to the manager until cancelled. `beat` builds each Heartbeat (it carries the
    node's current load); `on_return` is called when the manager answers again after an
    outage (the node uses it to resend kept results at once)."""

    def __init__(
        self,
        who: str,
        url: str,
        interval: float,
        client: httpx.AsyncClient,
        token: str,
        beat: Callable[[], Heartbeat],
        on_return: Callable[[], None] | None = None,
    ) -> None:
        self.who = who
        self.url = url
        self.interval = interval
        self._client = client
        self._token = token
        self._beat = beat
        self._on_return = on_return
        self._timeout = httpx.Timeout(min(5.0, max(interval, 1.0)))
        self.joined = False  # the manager has taken at least one beat
        self._down_since: float | None = None

    @classmethod
    def for_config(
        cls,
        config: EnvConfig,
        who: str,
        client: httpx.AsyncClient,
        token: str,
        beat: Callable[[], Heartbeat],
        on_return: Callable[[], None] | None = None,
    ) -> Membership | None:
        """The membership for the env's registry; None unless it is the built-in one."""
        if config.registry.backend != "builtin":
            return None
        return cls(
            who,
            f"{manager_url(config)}{API}/nodes/heartbeat",
            config.registry.heartbeat_interval,
            client,
            token,
            beat,
            on_return,
        )

    async def run(self) -> None:
        """Beat now, then every `interval` seconds, until cancelled."""
        while True:
            started = time.monotonic()
            await self.beat_once()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def beat_once(self) -> bool:
        """Send one heartbeat; True when the manager took it."""
        heartbeat = self._beat()
        why = await self._post(heartbeat)
        if why:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning(
                    "%s: heartbeat to %s failed: %s; retrying every %gs, jobs keep running",
                    self.who,
                    self.url,
                    why,
                    self.interval,
                )
            else:
                log.debug("%s: heartbeat failed again: %s", self.who, why)
            return False
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

    async def _post(self, heartbeat: Heartbeat) -> str:
        """'' when the manager took the beat, else why not."""
        try:
            response = await self._client.post(
                self.url,
                json=heartbeat.model_dump(mode="json"),
                headers=auth_headers(self._token),
                timeout=self._timeout,
            )
        except httpx.HTTPError as err:
            return f"{type(err).__name__}: {err}" if str(err) else repr(err)
        if 200 <= response.status_code <= 299:
            return ""
        why = f"HTTP {response.status_code}"
        if response.status_code == 401:
            why += " (the manager does not accept this node's access token)"
        return why
