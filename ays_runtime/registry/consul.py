"""The Consul registry: the node list in KV, one service per node, blocking-query watches.

What lives where in Consul (`registry.kv_prefix` = P, `registry.service_name` = S):

    KV  P/nodelist        JSON list of {"ip", "port", "node_group", "source"}, one entry per
                          ip:port, sorted; written only with check-and-set (`?cas=`), so
                          writers that race (two nodes starting at once, an operator's add)
                          never lose each other's entries. No ip:port goes into a key name
                          (recent Consul refuses `:` in keys).
    service S             one instance per node: ID `S-<ip>-<port>` (dots and colons as
                          dashes), Address/Port the node's, Tags [node_group], Meta
                          {version, node_group}, an HTTP check on the node's /api/v1/health
                          with the env's interval, timeout and DeregisterCriticalServiceAfter.

Manager side (`ConsulRegistry`): two blocking queries, each in its own daemon thread:
the node-list key, and `/v1/health/service/S` (every instance with its checks: one query
follows all nodes, however many). A node is online iff it is in the list and its instance has
every check passing. Each answer is applied on the event loop: `healthy_nodes` is recomputed
in memory, then `ays_node` is brought in line (status, last_seen, node_group, source,
version) and `on_node_lost(address)` is called for each online -> offline fall this manager
recorded (a guarded UPDATE, so with several managers only one handles a fall). A node that
leaves the list is no longer followed: its row stays, marked offline, so the runs it held
are failed as node lost (the reaper does the same); `DELETE /api/v1/nodes/{id}` removes it.

Blocking queries follow Consul's rules: the index comes from X-Consul-Index, `wait` is
WATCH_WAIT, an index that goes backwards (a Consul that lost its state) is reset to 0, an
index of 0 is never sent back (it would not block), and errors back off with jitter. While
Consul cannot be reached the last known states stay in force (scheduling goes on), the
outage is logged once, and the first answer after it is a full (non-blocking) read.

Node side: `add_to_nodelist`, `remove_from_nodelist` and `ConsulClient.register_service`
are used by `ays_runtime.node.membership.ConsulMembership`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import consul
import consul.callback
import consul.exceptions
import pydantic
import requests
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from ays_runtime.config import ConsulRegistrySettings, check_ip
from ays_runtime.exceptions import RegistryError, TransientRegistryError
from ays_runtime.registry.base import NodeRef, NodeRegistry, ensure_node_groups
from ays_runtime.retry import Backoff
from ays_runtime.storage.database import transaction, utcnow
from ays_runtime.storage.models import Node, NodeSource, NodeStatus

log = logging.getLogger("ays.registry")

NODELIST = "nodelist"
# How long a blocking query may be held by Consul; an unchanged answer at the end of it also
# refreshes last_seen of the online nodes.
WATCH_WAIT = "30s"
# Seconds a non-blocking request (and the connect of a blocking one) may take.
CLIENT_TIMEOUT = 10.0
# At most this many back-to-back queries per second per watch: a flapping node cannot make
# the manager pull the whole service list in a tight loop (Consul asks clients to rate-limit).
MIN_QUERY_GAP = 0.25
# A check-and-set write that loses this many races in a row gives up (TransientRegistryError).
CAS_ATTEMPTS = 16
# last_seen of online nodes is rewritten at most this often (it says "seen healthy", not more).
LAST_SEEN_REFRESH = 10.0
# After a failed database write, the states are written again this often.
DB_RETRY = 1.0
SYNC_ATTEMPTS = 3  # an insert racing another manager's is retried at once


def nodelist_key(settings: ConsulRegistrySettings) -> str:
    return f"{settings.kv_prefix.strip('/')}/{NODELIST}"


def service_id(settings: ConsulRegistrySettings, ip: str, port: int) -> str:
    """`aysnode-127-0-0-1-18181`: unique per ip:port, only characters Consul IDs all accept."""
    return f"{settings.service_name}-{re.sub(r'[^A-Za-z0-9]', '-', ip)}-{port}"


def go_duration(seconds: float) -> str:
    """Seconds as a Go duration string (what Consul's check fields take): 10 -> "10s"."""
    return f"{seconds:g}s"


# -- the node list codec --------------------------------------------------------------------


class NodeEntry(BaseModel):
    """One entry of the KV node list."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    ip: str
    port: int = Field(ge=1, le=65535)
    node_group: str = Field(min_length=1, max_length=64)
    source: Literal["manual", "self"] = NodeSource.MANUAL.value

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str) -> str:
        return check_ip(v)

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


def decode_nodelist(key: str, value: bytes | str | None) -> list[NodeEntry]:
    """The entries stored at `key` (no value: none). Raises RegistryError naming the key and
    the entry that is wrong; a duplicate ip:port keeps its first entry."""
    if value is None or not value.strip():
        return []
    try:
        data = json.loads(value)
    except ValueError as err:  # UnicodeDecodeError included
        raise RegistryError(
            f"consul KV {key}: not JSON ({err}); it must be a JSON list of "
            '{"ip": ..., "port": ..., "node_group": ...} objects: fix or delete the key'
        ) from None
    if not isinstance(data, list):
        raise RegistryError(
            f"consul KV {key}: holds a JSON {type(data).__name__}, not a list of "
            '{"ip": ..., "port": ..., "node_group": ...} objects: fix or delete the key'
        )
    entries: dict[str, NodeEntry] = {}
    for i, item in enumerate(data):
        try:
            entry = NodeEntry.model_validate(item)
        except pydantic.ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in err.errors()
            )
            raise RegistryError(
                f"consul KV {key}: entry {i} ({json.dumps(item)[:200]}) is not valid: {problems}"
            ) from None
        entries.setdefault(entry.address, entry)
    return list(entries.values())


def encode_nodelist(entries: list[NodeEntry]) -> str:
    """The stored form: sorted by ip then port, so an unchanged list is an identical write
    (which Consul does not count as a change)."""
    ordered = sorted(entries, key=lambda e: (_ip_key(e.ip), e.port))
    return json.dumps([e.model_dump() for e in ordered], separators=(",", ":"))


def _ip_key(ip: str) -> tuple[int, int]:
    parsed = ipaddress.ip_address(ip)
    return parsed.version, int(parsed)


# -- the client ------------------------------------------------------------------------------


class ConsulClient:
    """py-consul, with the env's address, ACL token (sent as a header) and timeouts, and its
    errors translated into RegistryError / TransientRegistryError at this boundary."""

    def __init__(self, settings: ConsulRegistrySettings, timeout: float = CLIENT_TIMEOUT) -> None:
        token = settings.token.get_secret_value() if settings.token else None
        self.settings = settings
        self.where = f"consul {settings.scheme}://{_host(settings.host)}:{settings.port}"
        self._consul = consul.Consul(
            host=settings.host,
            port=settings.port,
            scheme=settings.scheme,
            token=token,
            dc=settings.datacenter,
            verify=True,
            connections_timeout=timeout,
        )
        # The env file's token and nothing else (py-consul would prefer CONSUL_HTTP_TOKEN).
        self._consul.token = token

    def close(self) -> None:
        self._consul.http.session.close()

    def __enter__(self) -> ConsulClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        try:
            yield
        except requests.RequestException as err:
            raise TransientRegistryError(f"{self.where}: {what}: {_why(err)}") from None
        except consul.exceptions.ACLPermissionDenied as err:
            raise RegistryError(
                f"{self.where}: {what}: permission denied ({_first_line(err)}); give the ACL "
                "token in registry.token a policy with key_prefix write on registry.kv_prefix "
                "and service write on registry.service_name"
            ) from None
        except consul.exceptions.ConsulException as err:
            text = _first_line(err)
            if re.match(r"5\d\d\b", text):
                raise TransientRegistryError(f"{self.where}: {what}: {text}") from None
            raise RegistryError(f"{self.where}: {what}: {text}") from None

    # KV --------------------------------------------------------------------------------------

    def kv_get(
        self, key: str, index: int = 0, wait: str | None = None
    ) -> tuple[int, dict[str, Any] | None]:
        """(X-Consul-Index, the entry or None); blocks while `index` is current."""
        with self._calling(f"read {key}"):
            got, entry = self._consul.kv.get(key, index=index or None, wait=wait)
        return int(got), entry

    def kv_put(self, key: str, value: str, cas: int) -> bool:
        """Check-and-set write: False when `cas` is no longer the key's ModifyIndex."""
        with self._calling(f"write {key}"):
            return bool(self._consul.kv.put(key, value, cas=cas))

    # health ----------------------------------------------------------------------------------

    def health_service(
        self, name: str, index: int = 0, wait: str | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        """(X-Consul-Index, every instance of `name` with its checks); blocks as kv_get."""
        with self._calling(f"read the health of service {name}"):
            got, entries = self._consul.health.service(name, index=index or None, wait=wait)
        return int(got), entries or []

    # agent services ----------------------------------------------------------------------

    def register_service(
        self,
        sid: str,
        address: str,
        port: int,
        node_group: str,
        version: str,
        check_url: str,
    ) -> None:
        s = self.settings
        check = consul.Check.http(
            check_url,
            interval=go_duration(s.check_interval),
            timeout=go_duration(s.check_timeout),
            deregister=go_duration(s.deregister_after),
        )
        with self._calling(f"register service {sid}"):
            self._consul.agent.service.register(
                s.service_name,
                service_id=sid,
                address=address,
                port=port,
                tags=[node_group],
                meta={"version": version, "node_group": node_group},
                check=check,
                replace_existing_checks=True,
            )

    def service_registered(self, sid: str) -> bool:
        """Whether the agent still has service `sid` (an agent that lost its state has not)."""
        # py-consul's agent.service_definition sends no token: call the endpoint with it.
        with self._calling(f"read service {sid}"):
            found = self._consul.http.get(
                consul.callback.CB.json(),
                f"/v1/agent/service/{sid}",
                headers=self._consul.prepare_headers(),
            )
        return found is not None

    def deregister_service(self, sid: str) -> None:
        with self._calling(f"deregister service {sid}"):
            self._consul.agent.service.deregister(sid)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _why(err: requests.RequestException) -> str:
    """requests' messages nest three exceptions deep: the OS's reason is what matters."""
    if isinstance(err, requests.Timeout):
        return "timed out"
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(err))
    if found:
        return found.group(1).strip().lower()
    return f"{type(err).__name__}: {_first_line(err)}"


# -- check-and-set edits of the node list ----------------------------------------------------


def update_nodelist(
    client: ConsulClient,
    key: str,
    change: Callable[[list[NodeEntry]], list[NodeEntry] | None],
    rng: random.Random | None = None,
) -> bool:
    """Read the list, apply `change` (None: nothing to do), write it back with `cas` set to
    the ModifyIndex read (0: the key must not exist yet); on a lost race, read again. True when
    a write was made. Raises RegistryError, or TransientRegistryError after CAS_ATTEMPTS lost
    races in a row."""
    rng = rng or random.Random()
    for attempt in range(CAS_ATTEMPTS):
        _, entry = client.kv_get(key)
        current = decode_nodelist(key, entry["Value"] if entry else None)
        wanted = change(current)
        if wanted is None:
            return False
        if client.kv_put(key, encode_nodelist(wanted), cas=entry["ModifyIndex"] if entry else 0):
            return True
        time.sleep(rng.uniform(0, min(0.02 * 2**attempt, 0.5)))
    raise TransientRegistryError(
        f"{client.where}: write {key}: lost {CAS_ATTEMPTS} check-and-set races in a row to "
        "other writers; it will be tried again"
    )


def add_to_nodelist(client: ConsulClient, key: str, entry: NodeEntry) -> bool:
    """List `entry` once. An entry for the same ip:port is kept, unless its node group
    differs (the node came back in another group): then it is replaced."""

    def add(entries: list[NodeEntry]) -> list[NodeEntry] | None:
        same = [e for e in entries if e.address == entry.address]
        if same and same[0].node_group == entry.node_group:
            return None
        return [e for e in entries if e.address != entry.address] + [entry]

    return update_nodelist(client, key, add)


def remove_from_nodelist(client: ConsulClient, key: str, ip: str, port: int) -> bool:
    address = f"{check_ip(ip)}:{port}"

    def remove(entries: list[NodeEntry]) -> list[NodeEntry] | None:
        kept = [e for e in entries if e.address != address]
        return kept if len(kept) != len(entries) else None

    return update_nodelist(client, key, remove)


# -- health answers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """A service instance as the health endpoint shows it."""

    ip: str
    port: int
    passing: bool  # every check (the agent's node checks and the service's) is passing
    version: str

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


def parse_health(entries: list[dict[str, Any]]) -> dict[str, Instance]:
    """address -> instance; with several instances at one address, a passing one wins."""
    found: dict[str, Instance] = {}
    for item in entries:
        service = item.get("Service") or {}
        raw_ip = service.get("Address") or (item.get("Node") or {}).get("Address") or ""
        try:
            ip = str(ipaddress.ip_address(raw_ip))
            port = int(service.get("Port") or 0)
        except (ValueError, TypeError):
            continue  # not an address Ays could route to
        checks = item.get("Checks") or []
        instance = Instance(
            ip=ip,
            port=port,
            passing=all(c.get("Status") == "passing" for c in checks),
            version=str((service.get("Meta") or {}).get("version") or "")[:32],
        )
        if instance.address not in found or instance.passing:
            found[instance.address] = instance
    return found


# -- the manager's registry -------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    """What a read of Consul brought: the node list or the instances' health."""

    kind: Literal["nodelist", "health"]
    data: Any  # list[NodeEntry] | dict[str, Instance]
    modify_index: int = 0  # of the node-list key (0: no key)
    authoritative: bool = True  # a watch answer or a fresh read; False: a pushed payload


class _Outage:
    """Says once that Consul cannot be used (whichever reader sees it first), and once that
    it is back (when every reader that failed has succeeded again)."""

    def __init__(self, who: str, where: str) -> None:
        self.who = who
        self.where = where
        self._failing: set[str] = set()
        self._since = 0.0
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return bool(self._failing)

    def failed(self, reader: str, err: RegistryError) -> None:
        with self._lock:
            first = not self._failing
            self._failing.add(reader)
            if first:
                self._since = time.monotonic()
        if first:
            log.error(
                "%s: registry: %s; keeping the last known node states (scheduling goes on) "
                "and retrying with backoff",
                self.who,
                err,
            )
        else:
            log.debug("%s: registry: %s still failing: %s", self.who, reader, err)

    def succeeded(self, reader: str) -> None:
        with self._lock:
            if reader not in self._failing:
                return
            self._failing.discard(reader)
            back = not self._failing
            away = time.monotonic() - self._since
        if back:
            log.warning(
                "%s: registry: %s answers again after %.1fs; node states follow it again",
                self.who,
                self.where,
                away,
            )


class _Watch:
    """One blocking query, repeated in a daemon thread; each answer is handed to `deliver`
    (thread-safe). A daemon thread, not the loop's executor: a query held for WATCH_WAIT
    must not hold up the manager's exit."""

    def __init__(
        self,
        name: str,
        settings: ConsulRegistrySettings,
        fetch: Callable[[ConsulClient, int], tuple[int, _Answer]],
        deliver: Callable[[_Answer], None],
        outage: _Outage,
    ) -> None:
        self.name = name
        self.settings = settings
        self._fetch = fetch
        self._deliver = deliver
        self._outage = outage
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ays-consul-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        backoff = Backoff(first=0.5, cap=5.0)
        index = 0
        with ConsulClient(self.settings) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    got, answer = self._fetch(client, index)
                except RegistryError as err:
                    self._outage.failed(self.name, err)
                    index = 0  # after an error: a full read, not a blocking one
                    self._stop.wait(backoff.next())
                    continue
                backoff.reset()
                if self._stop.is_set():
                    return
                self._outage.succeeded(self.name)
                try:
                    self._deliver(answer)
                except RuntimeError:  # the loop is closed: the manager has stopped
                    return
                # Consul's rules: an index that went backwards is reset (its state was lost
                # and rebuilt); a 0 is never sent back (it would answer at once, forever).
                index = 0 if got < index else max(got, 1)
                self._stop.wait(max(0.0, MIN_QUERY_GAP - (time.monotonic() - started)))


class ConsulRegistry(NodeRegistry):
    """The manager's view of the nodes, from Consul (see the module docstring)."""

    def __init__(self, engine: Engine, settings: ConsulRegistrySettings, manager_id: str) -> None:
        self.engine = engine
        self.settings = settings
        self.manager_id = manager_id
        self.who = f"manager {manager_id}"
        self.key = nodelist_key(settings)
        self._outage = _Outage(self.who, f"consul {_host(settings.host)}:{settings.port}")
        self._healthy: dict[str, list[NodeRef]] = {}
        self._listed: dict[str, NodeEntry] | None = None  # None: not read yet
        self._instances: dict[str, Instance] | None = None
        self._nodelist_modify = -1
        self._events: asyncio.Queue[_Answer] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watches: list[_Watch] = []
        self._task: asyncio.Task[None] | None = None
        self._rereads: set[asyncio.Task[None]] = set()
        self._db_failing = False
        self._dirty = False
        self._seen_written = 0.0

    # -- the contract ---------------------------------------------------------------------

    def healthy_nodes(self, node_group: str) -> list[NodeRef]:
        return self._healthy.get(node_group, [])

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            # The last known states, for as long as Consul does not answer.
            self._healthy = await asyncio.to_thread(self._load_online)
        except SQLAlchemyError as err:
            log.error("%s: registry: cannot read ays_node: %s", self.who, _db_reason(err))
        self._watches = [
            _Watch("node list", self.settings, self._fetch_nodelist, self._deliver, self._outage),
            _Watch("health", self.settings, self._fetch_health, self._deliver, self._outage),
        ]
        for watch in self._watches:
            watch.start()
        self._task = asyncio.create_task(self._apply_loop(), name="registry-consul")
        log.info(
            "%s: registry: following %s key %s and service %s",
            self.who,
            self._outage.where,
            self.key,
            self.settings.service_name,
        )

    async def stop(self) -> None:
        for watch in self._watches:
            watch.stop()
        for task in [self._task, *self._rereads]:
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in [self._task, *self._rereads] if t is not None), return_exceptions=True
        )

    def list_node(self, ip: str, port: int, node_group: str) -> None:
        entry = NodeEntry(ip=ip, port=port, node_group=node_group, source="manual")
        with ConsulClient(self.settings) as client:
            if add_to_nodelist(client, self.key, entry):
                log.info(
                    "%s: registry: listed %s (%s) in %s",
                    self.who,
                    entry.address,
                    node_group,
                    self.key,
                )

    def unlist_node(self, ip: str, port: int) -> None:
        with ConsulClient(self.settings) as client:
            if remove_from_nodelist(client, self.key, ip, port):
                log.info("%s: registry: removed %s:%d from %s", self.who, ip, port, self.key)

    # -- Consul agent watch callbacks ---------------------------------------------------

    def watch_fired(self, payload: Any) -> None:
        """A Consul `key` watch handler call: `payload` is the key's KV entry (or null when
        the key is gone). Its value is applied at once if it is not older than what this
        manager has, then both watches' data are read again. Raises RegistryError when the
        payload is not the node-list key's entry."""
        if payload is not None:
            if not isinstance(payload, dict) or payload.get("Key") != self.key:
                shown = payload.get("Key") if isinstance(payload, dict) else type(payload).__name__
                raise RegistryError(
                    f"watch payload: expected the KV entry of {self.key}, got {shown!r}; "
                    f"the watch must be type key, key {self.key}"
                )
            try:
                raw = base64.b64decode(payload.get("Value") or "", validate=True)
                modify = int(payload.get("ModifyIndex") or 0)
            except (binascii.Error, ValueError, TypeError):
                raise RegistryError(
                    f"watch payload: {self.key}: Value is not base64 or ModifyIndex not a number"
                ) from None
            entries = decode_nodelist(self.key, raw)
            self._events.put_nowait(_Answer("nodelist", entries, modify, authoritative=False))
        task = asyncio.create_task(self._reread(), name="registry-consul-reread")
        self._rereads.add(task)
        task.add_done_callback(self._rereads.discard)

    async def _reread(self) -> None:
        def read() -> list[_Answer]:
            with ConsulClient(self.settings) as client:
                return [self._fetch_nodelist(client, 0)[1], self._fetch_health(client, 0)[1]]

        try:
            answers = await asyncio.to_thread(read)
        except RegistryError as err:
            # Not an outage of its own: the watches retry, and say so when Consul is away.
            log.warning("%s: registry: reread after a consul watch call failed: %s", self.who, err)
            return
        for answer in answers:
            self._events.put_nowait(answer)

    # -- reading Consul (watch threads) --------------------------------------------------

    def _fetch_nodelist(self, client: ConsulClient, index: int) -> tuple[int, _Answer]:
        got, entry = client.kv_get(self.key, index, WATCH_WAIT if index else None)
        entries = decode_nodelist(self.key, entry["Value"] if entry else None)
        modify = int(entry["ModifyIndex"]) if entry else 0
        return got, _Answer("nodelist", entries, modify)

    def _fetch_health(self, client: ConsulClient, index: int) -> tuple[int, _Answer]:
        got, entries = client.health_service(
            self.settings.service_name, index, WATCH_WAIT if index else None
        )
        return got, _Answer("health", parse_health(entries))

    def _deliver(self, answer: _Answer) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._events.put_nowait, answer)

    # -- applying answers (event loop) ---------------------------------------------------

    async def _apply_loop(self) -> None:
        while True:
            try:
                first = await asyncio.wait_for(
                    self._events.get(), DB_RETRY if self._dirty else None
                )
                answers = [first]
            except TimeoutError:
                answers = []
            while not self._events.empty():  # a burst of answers: one database write
                answers.append(self._events.get_nowait())
            for answer in answers:
                self._absorb(answer)
            if self._listed is None or self._instances is None:
                continue
            self._healthy = self._compute_healthy()
            try:
                await self._write_states()
            except Exception:  # a bug or a failing on_node_lost must not stop the follow
                log.exception("%s: registry: applying Consul's answer failed", self.who)
                self._dirty = True  # written again in DB_RETRY; the reaper covers lost runs

    def _absorb(self, answer: _Answer) -> None:
        if answer.kind == "health":
            self._instances = answer.data
            return
        if not answer.authoritative and answer.modify_index < self._nodelist_modify:
            return  # a pushed payload older than what a read already brought
        listed = {e.address: e for e in answer.data}
        if self._listed is not None:
            for address in listed.keys() - self._listed.keys():
                log.info(
                    "%s: registry: node %s (%s) joined the node list",
                    self.who,
                    address,
                    listed[address].node_group,
                )
            for address in self._listed.keys() - listed.keys():
                log.info(
                    "%s: registry: node %s left the node list: no longer followed",
                    self.who,
                    address,
                )
        self._listed = listed
        self._nodelist_modify = answer.modify_index

    def _compute_healthy(self) -> dict[str, list[NodeRef]]:
        assert self._listed is not None and self._instances is not None
        healthy: dict[str, list[NodeRef]] = {}
        for address, entry in self._listed.items():
            instance = self._instances.get(address)
            if instance is not None and instance.passing:
                healthy.setdefault(entry.node_group, []).append(
                    NodeRef(entry.ip, entry.port, entry.node_group)
                )
        for nodes in healthy.values():
            nodes.sort(key=lambda n: (n.ip, n.port))
        return healthy

    async def _write_states(self) -> None:
        assert self._listed is not None and self._instances is not None
        listed, instances = self._listed, self._instances
        refresh_seen = time.monotonic() - self._seen_written >= LAST_SEEN_REFRESH
        try:
            came, lost = await asyncio.to_thread(self._sync_rows, listed, instances, refresh_seen)
        except SQLAlchemyError as err:
            self._dirty = True
            if not self._db_failing:
                self._db_failing = True
                log.error(
                    "%s: registry: cannot write node states to the database, routing on "
                    "Consul's view meanwhile: %s",
                    self.who,
                    _db_reason(err),
                )
            return
        if self._db_failing:
            self._db_failing = False
            log.warning("%s: registry: node states written to the database again", self.who)
        self._dirty = False
        if refresh_seen:
            self._seen_written = time.monotonic()
        for address in came:
            log.info("%s: registry: node %s is online (consul checks passing)", self.who, address)
        for address in lost:
            log.warning(
                "%s: registry: node %s is offline (%s)",
                self.who,
                address,
                _why_offline(address, listed, instances),
            )
            if self.on_node_lost is not None:
                await self.on_node_lost(address)

    def _sync_rows(
        self, listed: dict[str, NodeEntry], instances: dict[str, Instance], refresh_seen: bool
    ) -> tuple[list[str], list[str]]:
        for attempt in range(SYNC_ATTEMPTS):
            try:
                return self._sync_rows_once(listed, instances, refresh_seen)
            except IntegrityError:
                # Another manager (or the API) inserted one of the rows first: read again.
                if attempt == SYNC_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _sync_rows_once(
        self, listed: dict[str, NodeEntry], instances: dict[str, Instance], refresh_seen: bool
    ) -> tuple[list[str], list[str]]:
        """Bring ays_node in line with Consul; (addresses now online, addresses that fell)."""
        online, offline, unknown = (
            NodeStatus.ONLINE.value,
            NodeStatus.OFFLINE.value,
            NodeStatus.UNKNOWN.value,
        )
        now = utcnow()
        joined = {e.node_group: e.address for e in listed.values()}

        def sync(conn: Connection) -> tuple[list[str], list[str], list[str]]:
            came: list[str] = []
            lost: list[str] = []
            rows = {
                f"{r.ip}:{r.port}": r
                for r in conn.execute(
                    select(
                        Node.id,
                        Node.ip,
                        Node.port,
                        Node.status,
                        Node.node_group,
                        Node.source,
                        Node.version,
                    )
                ).all()
            }
            created = ensure_node_groups(conn, joined)
            still_online: list[int] = []
            for address, entry in listed.items():
                instance = instances.get(address)
                passing = instance is not None and instance.passing
                row = rows.get(address)
                if row is None:
                    conn.execute(
                        insert(Node).values(
                            ip=entry.ip,
                            port=entry.port,
                            node_group=entry.node_group,
                            status=online if passing else offline if instance else unknown,
                            source=entry.source,
                            version=instance.version if instance else "",
                            running_jobs=0,
                            last_seen=now if passing else None,
                            created_at=now,
                            updated_at=now,
                        )
                    )
                    if passing:
                        came.append(address)
                    continue
                values: dict[str, Any] = {}
                if row.node_group != entry.node_group:
                    values["node_group"] = entry.node_group
                if row.source != entry.source:
                    values["source"] = entry.source
                if instance is not None and instance.version and row.version != instance.version:
                    values["version"] = instance.version
                if passing:
                    if row.status != online:
                        values.update(status=online, last_seen=now)
                        came.append(address)
                    else:
                        still_online.append(row.id)
                elif row.status == online:
                    if self._fall(conn, row.id, now, values):
                        lost.append(address)
                    continue
                elif row.status == unknown and instance is not None:
                    values["status"] = offline  # seen, not healthy
                if values:
                    conn.execute(
                        update(Node).where(Node.id == row.id).values(updated_at=now, **values)
                    )
            for address, row in rows.items():
                if address not in listed and row.status == online:
                    if self._fall(conn, row.id, now, {}):
                        lost.append(address)
            if refresh_seen and still_online:
                conn.execute(
                    update(Node)
                    .where(Node.id.in_(still_online), Node.status == online)
                    .values(last_seen=now)
                )
            return came, lost, created

        what = f"{self.who}: registry: bringing the node rows in line with consul"
        came, lost, created = transaction(self.engine, sync, what)
        for group in created:
            log.info(
                "%s: registry: node group %s created: node %s joined it",
                self.who,
                group,
                joined[group],
            )
        return came, lost

    @staticmethod
    def _fall(conn: Any, node_id: int, now: Any, values: dict[str, Any]) -> bool:
        """online -> offline, guarded: True only for the one writer that made the change."""
        changed = conn.execute(
            update(Node)
            .where(Node.id == node_id, Node.status == NodeStatus.ONLINE.value)
            .values(status=NodeStatus.OFFLINE.value, updated_at=now, **values)
        ).rowcount
        return bool(changed)

    def _load_online(self) -> dict[str, list[NodeRef]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Node.ip, Node.port, Node.node_group)
                .where(Node.status == NodeStatus.ONLINE.value)
                .order_by(Node.ip, Node.port)
            ).all()
        healthy: dict[str, list[NodeRef]] = {}
        for r in rows:
            healthy.setdefault(r.node_group, []).append(NodeRef(r.ip, r.port, r.node_group))
        return healthy


def _why_offline(address: str, listed: dict[str, Any], instances: dict[str, Instance]) -> str:
    if address not in listed:
        return "it left the node list"
    if address not in instances:
        return "no consul service at its address"
    return "a consul check is not passing"


def _db_reason(err: SQLAlchemyError) -> object:
    return getattr(err, "orig", None) or err
