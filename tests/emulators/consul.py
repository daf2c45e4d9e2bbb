"""A Consul HTTP API emulator for tests: one dev-mode agent that is also the only server.

Written from Consul's HTTP API documentation (website/content/api-docs: kv, agent/service,
agent/check, health, catalog, session, features/blocking) and, where the docs are silent,
from Consul's own source (hashicorp/consul: agent/kvs_endpoint.go, agent/consul/kvs_endpoint.go,
agent/consul/state/kvs.go, agent/blockingquery/blockingquery.go, agent/local/state.go
``UpdateCheck``, agent/checks/check.go, agent/agent.go ``addServiceInternal``,
agent/session_endpoint.go, agent/consul/session_endpoint.go, agent/http.go). It is not written
from what any client sends: JSON keys are matched case-insensitively and snake_case aliases are
accepted, as Consul's decoder does.

Public API::

    emu = ConsulEmulator(port=0, token=None, ...)   # see __init__ for the timing knobs
    emu.start(); emu.port; emu.url; emu.address; emu.index
    emu.stop()                      # prompt: wakes blocked queries, drops connections
    emu.start()                     # again, on the same port, with the same data (an outage)
    emu.restart()
    with ConsulEmulator() as emu: ...

Behaviour (faithful to Consul unless listed under "Deviations"):

* One global raft index. Every accepted write consumes one index even when it changes nothing;
  a table's index and an entry's ModifyIndex move only when data really changes.
* ``X-Consul-Index`` (never 0), ``X-Consul-KnownLeader: true``, ``X-Consul-LastContact: 0`` and
  ``X-Consul-Effective-Consistency: leader`` on KV, health, catalog and session reads, 404s
  included; never on /v1/agent/*.
* Blocking queries (``?index=N&wait=..``): Go duration syntax, default 5m, capped at 10m, plus
  up to wait/16 random jitter. A query returns as soon as its result index is > N; otherwise it
  sleeps until *its own* data changes (a per-resource watch) and re-evaluates, or until the wait
  expires, when it returns the current result. Indexes per query, as in Consul's state store:
  single key -> the key's ModifyIndex, or when the key is missing the KV table index
  (max of kvs and tombstones); ``?recurse``/``?keys`` -> the highest ModifyIndex or tombstone
  under the prefix (table index for the empty prefix); health/catalog of one service -> that
  service's index (bumped by changes of its instances or of their checks' catalog view, or of
  node checks), or the last-extinction index when no instance exists; sessions -> sessions table.
  A client index *ahead* of the server (e.g. after a state reset) is NOT answered at once:
  Consul's ``blockingquery.Query`` keeps waiting while result index <= N, so the query waits
  until its data changes or the wait expires; the client sees the index go backwards and must
  reset to 0, as the blocking-queries page prescribes.
* KV: GET (``raw``, ``recurse``, ``keys`` + ``separator``), PUT (``flags``, ``cas``,
  ``acquire``, ``release``, 512 KiB limit -> 413), DELETE (``recurse``, ``cas``). A write whose
  LockIndex/Key/Flags/Value/Session equal the stored entry is skipped by the state store, so
  ModifyIndex does not move (kvsSetTxn). A plain PUT keeps the lock holder (Session) but, as
  kvsSetTxn does, does not carry LockIndex over. Key names are validated as recent Consul does
  (``validateKVKey``): only ``[A-Za-z0-9,-_./]``, no leading ``/``, no ``../``, no
  "suspicious" file extensions (``.json``, ``.txt``, ...), 400 with Consul's message.
* Agent services and checks: register/deregister, ``Check`` and ``Checks`` (IDs
  ``service:<id>`` or ``service:<id>:<n>`` when more than one), initial status critical unless
  ``Status`` is given, a re-registration keeps the previous status/output of a check ID,
  ``replace-existing-checks``. HTTP checks really GET the URL (2xx passing, 429 warning, else
  critical; Consul's output format, 4 KiB output cap, 10 s default timeout), TCP checks really
  connect; both first run after a random stagger in [0, interval) and then every interval
  (minimum 1 s), with SuccessBeforePassing/FailuresBeforeCritical. TTL checks go critical with
  "TTL expired" when not updated in time. Check updates follow ``local.State.UpdateCheck``: an
  identical status+output is a no-op; a change of output only is kept on the agent
  (/v1/agent/checks) and reaches the catalog after check_update_interval/2 + random(interval)
  (default interval 5 m), so it does not bump the health index before then; a status change
  syncs at once. DeregisterCriticalServiceAfter reaps a service whose check has been critical
  (since it went critical, or since registration) for longer than the timeout.
* Sessions: create (Name, Node, Checks/NodeChecks/ServiceChecks, LockDelay default 15s with
  Consul's "small numbers are seconds" rule, Behavior release|delete, TTL 10s..24h), destroy
  (idempotent), renew (404 when gone), info (``[]`` when gone), list, node. Invalidation (destroy,
  TTL expiry, a referenced check going critical or being removed) releases or deletes held
  keys and starts the lock-delay, during which ``acquire`` on those keys returns false.
* ACL: with ``token=...`` every endpoint but /v1/status/* needs the token (``?token=``,
  ``X-Consul-Token`` or ``Authorization: Bearer``): none -> 403 "Permission denied", wrong one ->
  403 "ACL not found".
* An outage: ``stop()`` then ``start()`` keeps all data and the port; like a restarted agent and
  a new leader, TTL check timers and session TTL timers restart from a full TTL. A fresh
  ``ConsulEmulator(port=same)`` is a server that lost its data (indexes restart).

Deviations from real Consul (deliberate, for test speed or scope):

* Session TTL expiry happens after TTL x ``session_ttl_multiplier`` (default 1.0) + a small
  grace; real Consul invalidates at exactly 2 x TTL after the last renewal. Pass
  ``session_ttl_multiplier=2.0`` for Consul's timing.
* The critical-service reaper runs every ``check_reap_interval`` (default 1 s; Consul: 30 s) and
  DeregisterCriticalServiceAfter has no floor unless ``deregister_critical_min`` is set
  (Consul's floor is 1 m).
* The watch for a *missing* KV key wakes only on writes to that key. Consul's radix-tree watch
  may also wake it on writes to neighbouring keys, after which it returns at once because the
  table index moved; both are allowed by the blocking-query contract.
* ACL is one management token; Consul would filter some list results instead of denying them.
* Script, gRPC, H2PING, UDP, Docker, OS-service and alias checks are not run: script checks are
  refused as on an agent without enable_script_checks, the others with 400. ``filter``
  expressions are refused with 400 rather than ignored. ``near`` is ignored (one node).
* Tombstones are never reaped; transactions (/v1/txn), prepared queries, events, Connect,
  namespaces/partitions, the agent cache and hash-based blocking are not emulated.
* Output-only check changes are also not re-synced by Consul's periodic anti-entropy run.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import http.client
import json
import random
import re
import socket
import socketserver
import ssl
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["ConsulEmulator"]

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"
_STATUSES = (PASSING, WARNING, CRITICAL)
SERF_CHECK_ID = "serfHealth"

_DEFAULT_QUERY_TIME = 300.0  # 5m
_MAX_QUERY_TIME = 600.0  # 10m
_JITTER_FRACTION = 16
_OUTPUT_MAX_SIZE = 4096  # checks.DefaultBufSize
_DEFAULT_CHECK_TIMEOUT = 10.0
_SESSION_TTL_MAX = 86400.0
_LOCK_DELAY_MIN_THRESHOLD_NS = 1000
_TICK = 0.05
_JOIN_TIMEOUT = 5.0

# validateKVKey (agent/kvs_endpoint.go)
_KV_SUSPICIOUS_EXTENSIONS = (
    ".js", ".css", ".html", ".htm", ".xml", ".json", ".txt", ".log",
    ".php", ".asp", ".jsp", ".cgi", ".pl", ".py", ".rb", ".sh",
    ".exe", ".dll", ".bat", ".cmd", ".com", ".scr", ".vbs",
    ".pdf", ".doc", ".docx", ".xls", ".xlsx", ".ppt", ".pptx",
    ".zip", ".rar", ".tar", ".gz", ".7z", ".bz2",
    ".jpg", ".jpeg", ".png", ".gif", ".svg", ".ico", ".bmp",
    ".mp3", ".mp4", ".avi", ".mov", ".wmv", ".flv", ".swf",
    ".woff", ".woff2", ".ttf", ".eot", ".otf",
)  # fmt: skip
_KV_ENCODED_TRAVERSAL = ("%2e%2e%2f", "%2e%2e/", "..%2f", "%2e%2e%5c")
_META_KEY_RE = re.compile(r"^[a-zA-Z0-9_-]+$")


# ---------------------------------------------------------------------------------------------
# Go-compatible durations


_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_go_duration(text: str) -> float:
    """Parse a Go ``time.ParseDuration`` string ("10s", "1m30s", "100ms") into seconds."""
    orig = text
    sign = 1.0
    if text[:1] in ("+", "-"):
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f'time: invalid duration "{orig}"')
    total = 0.0
    pos = 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            if re.fullmatch(r"\d+\.?\d*", text[pos:]):
                raise ValueError(f'time: missing unit in duration "{orig}"')
            raise ValueError(f'time: invalid duration "{orig}"')
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return sign * total


def format_go_duration(seconds: float) -> str:
    """Format seconds the way Go's ``time.Duration.String`` does ("1m0s", "100ms")."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    neg, ns = ns < 0, abs(ns)

    def frac(value: int, unit: int) -> str:
        whole, rest = divmod(value, unit)
        if not rest:
            return str(whole)
        digits = str(rest).rjust(len(str(unit)) - 1, "0").rstrip("0")
        return f"{whole}.{digits}"

    if ns < 1_000:
        out = f"{ns}ns"
    elif ns < 1_000_000:
        out = frac(ns, 1_000) + "µs"
    elif ns < 1_000_000_000:
        out = frac(ns, 1_000_000) + "ms"
    else:
        hours, rest = divmod(ns, 3_600_000_000_000)
        minutes, rest = divmod(rest, 60_000_000_000)
        out = f"{hours}h" if hours else ""
        if hours or minutes:
            out += f"{minutes}m"
        out += frac(rest, 1_000_000_000) + "s"
    return "-" + out if neg else out


def _duration_field(value: Any, name: str) -> float:
    """A JSON duration field: a Go duration string, or a number of nanoseconds."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, bool):
        raise ValueError(f"{name}: invalid duration {value!r}")
    if isinstance(value, (int, float)):
        return float(value) / 1e9
    if isinstance(value, str):
        return parse_go_duration(value)
    raise ValueError(f"{name}: invalid duration {value!r}")


# ---------------------------------------------------------------------------------------------
# Small helpers


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Request:
    method: str
    path: str
    raw_path: str
    query: dict[str, list[str]]
    headers: Any
    body: bytes


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _go_json(obj: Any, pretty: bool = False) -> bytes:
    """JSON as Go's encoding/json writes it (compact, UTF-8, <>& escaped)."""
    if pretty:
        text = json.dumps(obj, indent=4, ensure_ascii=False) + "\n"
    else:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode("utf-8")


def _norm_key(key: str) -> str:
    return key.lower().replace("_", "").replace("-", "")


def _get(obj: dict[str, Any], *names: str, default: Any = None) -> Any:
    """Case-insensitive field lookup accepting snake_case aliases, as Consul's decoder does."""
    wanted = {_norm_key(n) for n in names}
    for key, value in obj.items():
        if isinstance(key, str) and _norm_key(key) in wanted:
            return value
    return default


def _has(obj: dict[str, Any], *names: str) -> bool:
    wanted = {_norm_key(n) for n in names}
    return any(isinstance(k, str) and _norm_key(k) in wanted for k in obj)


def _qget(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def _qbool(query: dict[str, list[str]], name: str) -> bool:
    """Consul's getBoolQueryParam: present and empty means true."""
    if name not in query:
        return False
    value = query[name][0].strip().lower()
    if value == "":
        return True
    if value in ("1", "t", "true"):
        return True
    if value in ("0", "f", "false"):
        return False
    raise _HTTPError(400, f"Invalid value for ?{name}")


def _parse_uint(value: str) -> int:
    if not value.isdigit():
        raise _HTTPError(500, f'strconv.ParseUint: parsing "{value}": invalid syntax')
    number = int(value)
    if number >= 2**64:
        raise _HTTPError(500, f'strconv.ParseUint: parsing "{value}": value out of range')
    return number


def validate_kv_key(key: str) -> str | None:
    """Consul's validateKVKey: the error text for a bad key, or None."""
    if key == "":
        return "key cannot be empty"
    if key.startswith("/"):
        return "key must not begin with a '/'"
    for position, char in enumerate(key):
        if not (
            ("a" <= char <= "z") or ("A" <= char <= "Z") or ("0" <= char <= "9") or char in ",-_./"
        ):
            return (
                f"key contains invalid character '{char}' at position {position}. "
                "Only alphanumeric characters and ,-_./ are allowed"
            )
    if "../" in key or "..\\" in key:
        return "key contains path traversal sequence"
    if any(seq in key for seq in _KV_ENCODED_TRAVERSAL):
        return "key contains encoded path traversal sequence"
    lower = key.lower()
    for ext in _KV_SUSPICIOUS_EXTENSIONS:
        if lower.endswith(ext):
            return f"key contains suspicious file extension '{ext}' that may be cached by proxies"
    return None


# ---------------------------------------------------------------------------------------------
# State records


@dataclass
class _KVEntry:
    key: str
    value: bytes | None
    flags: int = 0
    session: str = ""
    lock_index: int = 0
    create_index: int = 0
    modify_index: int = 0

    def equal(self, other: _KVEntry) -> bool:
        """structs.DirEntry.Equal."""
        return (
            self.lock_index == other.lock_index
            and self.key == other.key
            and self.flags == other.flags
            and (self.value or b"") == (other.value or b"")
            and self.session == other.session
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "LockIndex": self.lock_index,
            "Key": self.key,
            "Flags": self.flags,
            "Value": base64.b64encode(self.value).decode("ascii") if self.value else None,
        }
        if self.session:
            out["Session"] = self.session
        out["CreateIndex"] = self.create_index
        out["ModifyIndex"] = self.modify_index
        return out


@dataclass
class _Service:
    id: str
    name: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str]
    weights: dict[str, int]
    enable_tag_override: bool = False
    agent: bool = True  # False for the server's own "consul" service
    create_index: int = 0
    modify_index: int = 0

    def view(self) -> tuple[Any, ...]:
        return (
            self.name,
            tuple(self.tags),
            self.address,
            self.port,
            tuple(sorted(self.meta.items())),
            tuple(sorted(self.weights.items())),
            self.enable_tag_override,
        )


@dataclass
class _CheckDef:
    """A parsed CheckType (what to run), independent of the check's state."""

    check_id: str = ""
    name: str = ""
    status: str = ""
    notes: str = ""
    kind: str = ""  # http | tcp | ttl | script | unsupported
    http: str = ""
    method: str = ""
    header: dict[str, list[str]] = field(default_factory=dict)
    body: str = ""
    tcp: str = ""
    interval: float = 0.0
    timeout: float = 0.0
    ttl: float = 0.0
    deregister_after: float = 0.0
    tls_skip_verify: bool = False
    output_max_size: int = _OUTPUT_MAX_SIZE
    success_before_passing: int = 0
    failures_before_critical: int = 0
    service_id: str = ""

    def definition_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.http:
            out["HTTP"] = self.http
        if self.tls_skip_verify:
            out["TLSSkipVerify"] = True
        if self.header:
            out["Header"] = self.header
        if self.method:
            out["Method"] = self.method
        if self.body:
            out["Body"] = self.body
        if self.tcp:
            out["TCP"] = self.tcp
        if self.interval:
            out["Interval"] = format_go_duration(self.interval)
        if self.timeout:
            out["Timeout"] = format_go_duration(self.timeout)
        if self.ttl:
            out["TTL"] = format_go_duration(self.ttl)
        if self.deregister_after:
            out["DeregisterCriticalServiceAfter"] = format_go_duration(self.deregister_after)
        return out


@dataclass
class _Check:
    id: str
    name: str
    kind: str
    notes: str
    service_id: str
    service_name: str
    service_tags: list[str]
    definition: _CheckDef
    status: str = CRITICAL  # the agent's (local) view
    output: str = ""
    agent: bool = True  # False for serfHealth
    # the catalog's view, as last synced
    in_catalog: bool = False
    catalog_view: tuple[Any, ...] | None = None
    cat_status: str = CRITICAL
    cat_output: str = ""
    create_index: int = 0
    modify_index: int = 0
    # agent-side timers and counters
    critical_since: float | None = None
    ttl_deadline: float | None = None
    last_ttl_output: str = ""
    deferred_at: float | None = None
    success_counter: int = 0
    failures_counter: int = 0
    runner_stop: threading.Event | None = None

    def view(self) -> tuple[Any, ...]:
        """What HealthCheck.IsSame compares."""
        return (
            self.name,
            self.status,
            self.output,
            self.notes,
            self.service_id,
            self.service_name,
            tuple(self.service_tags),
            self.kind,
            json.dumps(self.definition.definition_json(), sort_keys=True),
        )


@dataclass
class _Session:
    id: str
    name: str
    node: str
    lock_delay: float
    behavior: str
    ttl: str
    ttl_seconds: float
    node_checks: list[str]
    service_checks: list[str]
    create_index: int
    modify_index: int
    deadline: float | None = None

    def check_ids(self) -> list[str]:
        return [*self.node_checks, *self.service_checks]

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": round(self.lock_delay * 1e9),
            "Behavior": self.behavior,
            "TTL": self.ttl,
            "NodeChecks": list(self.node_checks),
            "ServiceChecks": [{"ID": c, "Namespace": ""} for c in self.service_checks] or None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


class _Waiter:
    __slots__ = ("event", "matches")

    def __init__(self, matches: Any) -> None:
        self.event = threading.Event()
        self.matches = matches


# ---------------------------------------------------------------------------------------------
# Probes (run outside the lock, in a check's own thread)


def _split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _net_error(address: str, exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return f"dial tcp {address}: connect: connection refused"
    if isinstance(exc, TimeoutError):
        return f"dial tcp {address}: i/o timeout"
    return f"dial tcp {address}: {exc}"


def _probe_http(check: _CheckDef) -> tuple[str, str]:
    method = check.method or "GET"
    url = check.http
    op = method[:1].upper() + method[1:].lower()
    parts = urllib.parse.urlsplit(url)
    timeout = check.timeout or _DEFAULT_CHECK_TIMEOUT
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return CRITICAL, f'{op} "{url}": unsupported protocol scheme "{parts.scheme}"'
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = f"{parts.hostname}:{port}"
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context()
        if check.tls_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(parts.hostname, port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
    headers = {
        "User-Agent": "Consul Health Check",
        "Accept": "text/plain, text/*, */*",
        "Connection": "close",
    }
    for name, values in check.header.items():
        headers[name] = ", ".join(values) if isinstance(values, list) else str(values)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    try:
        try:
            conn.request(method, target, body=check.body.encode() or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            status_line = f"{response.status} {response.reason}"
            code = response.status
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as exc:
        if isinstance(exc, TimeoutError):
            reason = "context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
        elif isinstance(exc, OSError):
            reason = _net_error(address, exc)
        else:
            reason = str(exc) or type(exc).__name__
        return CRITICAL, f'{op} "{url}": {reason}'
    text = data[-check.output_max_size :].decode("utf-8", "replace")
    result = f"HTTP {method} {url}: {status_line} Output: {text}"
    if 200 <= code <= 299:
        return PASSING, result
    if code == 429:
        return WARNING, result
    return CRITICAL, result


def _probe_tcp(check: _CheckDef) -> tuple[str, str]:
    timeout = check.timeout or _DEFAULT_CHECK_TIMEOUT
    try:
        host, port = _split_host_port(check.tcp)
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        return CRITICAL, _net_error(check.tcp, exc)
    return PASSING, f"TCP connect {check.tcp}: Success"


# ---------------------------------------------------------------------------------------------
# HTTP server plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], emulator: ConsulEmulator) -> None:
        self.emulator = emulator
        self.track_lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.threads: set[threading.Thread] = set()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection, args=(request, client_address), daemon=True
        )
        with self.track_lock:
            self.connections.add(request)
            self.threads.add(thread)
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self.track_lock:
                self.connections.discard(request)
                self.threads.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-response is not an emulator error

    def drop_connections(self) -> list[threading.Thread]:
        with self.track_lock:
            connections = list(self.connections)
            threads = list(self.threads)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        return threads


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        # Go's net/http sends a Date header but no Server header.
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def do_GET(self) -> None:  # noqa: N802
        self._serve("GET")

    def do_PUT(self) -> None:  # noqa: N802
        self._serve("PUT")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve("HEAD")

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self, method: str) -> None:
        emulator = self.server.emulator
        raw_path, _, raw_query = self.path.partition("?")
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            response = _Response(400, b"Invalid request body", "text/plain; charset=utf-8")
        else:
            request = _Request(
                method=method,
                path=urllib.parse.unquote(raw_path),
                raw_path=raw_path,
                query=urllib.parse.parse_qs(raw_query, keep_blank_values=True),
                headers=self.headers,
                body=body,
            )
            response = emulator._dispatch(request)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        if response.content_type:
            self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        if not emulator.running:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response.body)


# ---------------------------------------------------------------------------------------------
# The emulator


class ConsulEmulator:
    """An in-process Consul agent (dev mode: agent and sole server) on 127.0.0.1."""

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        token: str | None = None,
        datacenter: str = "dc1",
        node_name: str = "consul-emulator",
        check_update_interval: float = 300.0,
        check_reap_interval: float = 1.0,
        deregister_critical_min: float = 0.0,
        min_check_interval: float = 1.0,
        session_ttl_min: float = 10.0,
        session_ttl_multiplier: float = 1.0,
        session_ttl_grace: float = 0.1,
        kv_max_value_size: int = 512 * 1024,
    ) -> None:
        """Configure (but do not start) an emulator.

        *port* 0 picks an ephemeral port on the first start(); later starts reuse it.
        *token* enables ACLs with that single management token.
        Timing knobs, with Consul's own value in brackets:
        *check_update_interval* [5m] delay before an output-only check change reaches the
        catalog; *check_reap_interval* [30s] period of the critical-service reaper;
        *deregister_critical_min* [1m] floor of DeregisterCriticalServiceAfter;
        *min_check_interval* [1s]; *session_ttl_min* [10s]; *session_ttl_multiplier* [2];
        *session_ttl_grace* extra seconds before a session is invalidated.
        """
        self._host = host
        self._port = port
        self._token = token
        self.datacenter = datacenter
        self.node_name = node_name
        self.check_update_interval = check_update_interval
        self.check_reap_interval = check_reap_interval
        self.deregister_critical_min = deregister_critical_min
        self.min_check_interval = min_check_interval
        self.session_ttl_min = session_ttl_min
        self.session_ttl_multiplier = session_ttl_multiplier
        self.session_ttl_grace = session_ttl_grace
        self.kv_max_value_size = kv_max_value_size

        self._lock = threading.RLock()
        self._lifecycle = threading.Lock()
        self._running = False
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._ticker_thread: threading.Thread | None = None
        self._ticker_stop = threading.Event()
        self._waiters: set[_Waiter] = set()
        self._runner_threads: set[threading.Thread] = set()

        self._raft_index = 0
        self._tables: dict[str, int] = {}
        self._kv: dict[str, _KVEntry] = {}
        self._tombstones: dict[str, int] = {}
        self._lock_delay: dict[str, float] = {}
        self._services: dict[str, _Service] = {}
        self._checks: dict[str, _Check] = {}
        self._sessions: dict[str, _Session] = {}
        self._node_id = str(uuid.uuid4())
        self._node_index = 0
        self._bootstrap()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._running

    @property
    def index(self) -> int:
        """The current raft index (the last write's)."""
        with self._lock:
            return self._raft_index

    def start(self) -> ConsulEmulator:
        """Listen and serve; after stop(), resumes on the same port with the same data."""
        with self._lifecycle:
            if self._running:
                return self
            server = _Server((self._host, self._port), self)
            self._port = server.server_address[1]
            self._server = server
            with self._lock:
                self._running = True
                now = time.monotonic()
                for check in self._checks.values():
                    if check.definition.kind == "ttl":
                        check.ttl_deadline = now + check.definition.ttl
                    if check.definition.kind in ("http", "tcp"):
                        self._start_runner(check)
                for sess in self._sessions.values():
                    self._reset_session_timer(sess, now)
            self._ticker_stop = threading.Event()
            self._ticker_thread = threading.Thread(
                target=self._tick_loop, args=(self._ticker_stop,), daemon=True
            )
            self._ticker_thread.start()
            self._serve_thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._serve_thread.start()
            return self

    def stop(self) -> None:
        """Stop promptly: wake blocked queries, close the listener and every connection."""
        with self._lifecycle:
            if not self._running or self._server is None:
                return
            server = self._server
            with self._lock:
                self._running = False
                for waiter in list(self._waiters):
                    waiter.event.set()
                for check in self._checks.values():
                    self._stop_runner(check)
                runners = list(self._runner_threads)
            self._ticker_stop.set()
            server.shutdown()
            server.server_close()
            deadline = time.monotonic() + _JOIN_TIMEOUT
            for thread in server.drop_connections():
                thread.join(max(0.0, deadline - time.monotonic()))
            for thread in (self._serve_thread, self._ticker_thread, *runners):
                if thread is not None:
                    thread.join(max(0.0, deadline - time.monotonic()))
            self._server = None
            self._serve_thread = None
            self._ticker_thread = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> ConsulEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- raft / tables / watches ----------------------------------------------------------------

    def _next_index(self) -> int:
        self._raft_index += 1
        return self._raft_index

    def _table(self, *names: str) -> int:
        return max((self._tables.get(n, 0) for n in names), default=0)

    def _emit(self, *event: str) -> None:
        for waiter in list(self._waiters):
            if waiter.matches(event):
                waiter.event.set()

    def _bootstrap(self) -> None:
        idx = self._next_index()
        self._node_index = idx
        self._tables["nodes"] = idx
        serf = _Check(
            id=SERF_CHECK_ID,
            name="Serf Health Status",
            kind="",
            notes="",
            service_id="",
            service_name="",
            service_tags=[],
            definition=_CheckDef(),
            status=PASSING,
            output="Agent alive and reachable",
            agent=False,
        )
        self._checks[SERF_CHECK_ID] = serf
        self._catalog_sync_check(serf, idx)
        idx = self._next_index()
        consul = _Service(
            id="consul",
            name="consul",
            tags=[],
            address="",
            port=8300,
            meta={},
            weights={"Passing": 1, "Warning": 1},
            agent=False,
        )
        self._catalog_put_service(consul, idx)

    # -- catalog writes (called under the lock with the write's raft index) ---------------------

    def _touch_service(self, name: str, idx: int) -> None:
        self._tables[f"service.{name}"] = idx
        self._emit("service", name)

    def _service_exists(self, name: str) -> bool:
        return any(s.name == name for s in self._services.values())

    def _catalog_put_service(self, svc: _Service, idx: int) -> bool:
        old = self._services.get(svc.id)
        if old is not None and old.view() == svc.view():
            svc.create_index, svc.modify_index = old.create_index, old.modify_index
            self._services[svc.id] = svc
            return False
        svc.create_index = old.create_index if old is not None else idx
        svc.modify_index = idx
        self._services[svc.id] = svc
        self._tables["services"] = idx
        self._touch_service(svc.name, idx)
        if old is not None and old.name != svc.name:
            self._service_gone(old.name, idx)
        self._emit("services", svc.name)
        return True

    def _service_gone(self, name: str, idx: int) -> None:
        if self._service_exists(name):
            self._touch_service(name, idx)
        else:
            self._tables.pop(f"service.{name}", None)
            self._tables["service_last_extinction"] = idx
            self._emit("service", name)

    def _catalog_remove_service(self, sid: str, idx: int) -> None:
        svc = self._services.pop(sid, None)
        if svc is None:
            return
        for check in [c for c in self._checks.values() if c.service_id == sid]:
            self._catalog_remove_check(check, idx)
        self._tables["services"] = idx
        self._service_gone(svc.name, idx)
        self._emit("services", svc.name)

    def _catalog_sync_check(self, check: _Check, idx: int) -> bool:
        view = check.view()
        if check.in_catalog and check.catalog_view == view:
            return False
        if not check.in_catalog:
            check.create_index = idx
            check.in_catalog = True
        check.catalog_view = view
        check.cat_status, check.cat_output = check.status, check.output
        check.modify_index = idx
        self._tables["checks"] = idx
        self._emit("checks", check.service_name)
        if check.service_id:
            svc = self._services.get(check.service_id)
            if svc is not None:
                self._touch_service(svc.name, idx)
        else:
            for name in {s.name for s in self._services.values()}:
                self._touch_service(name, idx)
        if check.cat_status == CRITICAL:
            self._invalidate_sessions_for_check(check.id, idx)
        return True

    def _catalog_remove_check(self, check: _Check, idx: int) -> None:
        self._stop_runner(check)
        if self._checks.get(check.id) is check:
            del self._checks[check.id]
        if not check.in_catalog:
            return
        self._tables["checks"] = idx
        self._emit("checks", check.service_name)
        svc = self._services.get(check.service_id)
        if svc is not None:
            self._touch_service(svc.name, idx)
        self._invalidate_sessions_for_check(check.id, idx)

    def _sync_check(self, check: _Check) -> None:
        """Anti-entropy for one check: one raft write if the catalog view differs."""
        if self._checks.get(check.id) is not check:
            return
        if check.in_catalog and check.catalog_view == check.view():
            return
        self._catalog_sync_check(check, self._next_index())

    # -- agent-side check state ----------------------------------------------------------------

    def _update_check(self, check: _Check, status: str, output: str) -> None:
        """local.State.UpdateCheck."""
        now = time.monotonic()
        if status == CRITICAL:
            if check.critical_since is None:
                check.critical_since = now
        else:
            check.critical_since = None
        if check.status == status and check.output == output:
            return
        if self.check_update_interval > 0 and check.status == status:
            check.output = output
            if check.deferred_at is None:
                interval = self.check_update_interval
                check.deferred_at = now + interval / 2 + random.uniform(0, interval)
            return
        check.status = status
        check.output = output
        self._sync_check(check)

    def _status_handler(self, check: _Check, status: str, output: str) -> None:
        """checks.StatusHandler: SuccessBeforePassing / FailuresBeforeCritical."""
        definition = check.definition
        if status in (PASSING, WARNING):
            check.success_counter += 1
            check.failures_counter = 0
            if check.success_counter >= definition.success_before_passing:
                self._update_check(check, status, output)
        else:
            check.failures_counter += 1
            check.success_counter = 0
            if check.failures_counter >= definition.failures_before_critical:
                self._update_check(check, status, output)

    def _start_runner(self, check: _Check) -> None:
        if not self._running or check.definition.kind not in ("http", "tcp"):
            return
        self._stop_runner(check)
        stop = threading.Event()
        check.runner_stop = stop
        thread = threading.Thread(
            target=self._run_check, args=(check, stop), daemon=True, name=f"check {check.id}"
        )
        self._runner_threads.add(thread)
        thread.start()

    def _stop_runner(self, check: _Check) -> None:
        if check.runner_stop is not None:
            check.runner_stop.set()
            check.runner_stop = None

    def _run_check(self, check: _Check, stop: threading.Event) -> None:
        definition = check.definition
        probe = _probe_http if definition.kind == "http" else _probe_tcp
        interval = max(definition.interval, self.min_check_interval)
        try:
            if stop.wait(random.uniform(0, interval)):
                return
            while True:
                status, output = probe(definition)
                with self._lock:
                    if stop.is_set() or check.runner_stop is not stop:
                        return
                    self._status_handler(check, status, output)
                if stop.wait(interval):
                    return
        finally:
            with self._lock:
                self._runner_threads.discard(threading.current_thread())

    def _tick_loop(self, stop: threading.Event) -> None:
        next_reap = time.monotonic() + self.check_reap_interval
        while not stop.wait(_TICK):
            now = time.monotonic()
            with self._lock:
                if not self._running:
                    continue
                for check in list(self._checks.values()):
                    if check.ttl_deadline is not None and check.ttl_deadline <= now:
                        check.ttl_deadline = None
                        output = "TTL expired"
                        if check.last_ttl_output:
                            output += (
                                " (last output before timeout follows): " + check.last_ttl_output
                            )
                        self._update_check(check, CRITICAL, output)
                    if check.deferred_at is not None and check.deferred_at <= now:
                        check.deferred_at = None
                        self._sync_check(check)
                for sess in list(self._sessions.values()):
                    if sess.deadline is not None and sess.deadline <= now:
                        self._destroy_session(sess.id, self._next_index())
                if now >= next_reap:
                    next_reap = now + self.check_reap_interval
                    self._reap_critical_services(now)

    def _reap_critical_services(self, now: float) -> None:
        reaped: set[str] = set()
        for check in list(self._checks.values()):
            timeout = check.definition.deregister_after
            if not check.service_id or check.service_id in reaped or timeout <= 0:
                continue
            timeout = max(timeout, self.deregister_critical_min)
            if check.critical_since is not None and now - check.critical_since > timeout:
                reaped.add(check.service_id)
                self._catalog_remove_service(check.service_id, self._next_index())

    # -- sessions ----------------------------------------------------------------------------

    def _reset_session_timer(self, sess: _Session, now: float) -> None:
        if sess.ttl_seconds > 0:
            ttl = sess.ttl_seconds * self.session_ttl_multiplier + self.session_ttl_grace
            sess.deadline = now + ttl

    def _destroy_session(self, sid: str, idx: int) -> None:
        """state.deleteSessionTxn: release or delete held keys, start their lock-delay."""
        sess = self._sessions.pop(sid, None)
        if sess is None:
            return
        self._tables["sessions"] = idx
        self._emit("session", sid)
        held = sorted((e for e in self._kv.values() if e.session == sid), key=lambda e: e.key)
        if sess.lock_delay > 0:
            expires = time.monotonic() + sess.lock_delay
            for entry in held:
                self._lock_delay[entry.key] = expires
        for entry in held:
            if sess.behavior == "delete":
                self._kvs_delete_txn(idx, entry.key)
            else:
                self._kvs_set_txn(idx, replace(entry, session=""), update_session=True)

    def _invalidate_sessions_for_check(self, check_id: str, idx: int) -> None:
        for sess in list(self._sessions.values()):
            if check_id in sess.check_ids():
                self._destroy_session(sess.id, idx)

    # -- KV state store ------------------------------------------------------------------------

    def _kvs_set_txn(self, idx: int, entry: _KVEntry, update_session: bool) -> bool:
        existing = self._kv.get(entry.key)
        entry.create_index = existing.create_index if existing is not None else idx
        if not update_session:
            entry.session = existing.session if existing is not None else ""
        if existing is not None and existing.equal(entry):
            entry.modify_index = existing.modify_index
            return False
        entry.modify_index = idx
        self._kv[entry.key] = entry
        self._tables["kvs"] = idx
        self._emit("kv", entry.key)
        return True

    def _kvs_delete_txn(self, idx: int, key: str) -> bool:
        if key not in self._kv:
            return False
        del self._kv[key]
        self._tombstones[key] = idx
        self._tables["kvs"] = idx
        self._tables["tombstones"] = idx
        self._emit("kv", key)
        return True

    def _kv_list_index(self, prefix: str, entries: list[_KVEntry]) -> int:
        table = self._table("kvs", "tombstones")
        if prefix == "":
            return table
        lindex = max((e.modify_index for e in entries), default=0)
        gindex = max((i for k, i in self._tombstones.items() if k.startswith(prefix)), default=0)
        lindex = max(lindex, gindex)
        return lindex or table

    # -- HTTP dispatch -------------------------------------------------------------------------

    def _dispatch(self, req: _Request) -> _Response:
        try:
            return self._route(req)
        except _HTTPError as exc:
            return _Response(exc.status, exc.message.encode("utf-8"), "text/plain; charset=utf-8")
        except Exception as exc:  # an emulator bug must still answer, never hang the client
            return _Response(500, f"emulator error: {exc!r}".encode(), "text/plain")

    def _route(self, req: _Request) -> _Response:
        path = req.path
        if not path.startswith("/v1/"):
            raise _HTTPError(404, "404 page not found\n")
        if self._token is not None and not path.startswith("/v1/status/"):
            self._check_acl(req)
        for prefix, exact, methods, handler in self._routes():
            if (path == prefix) if exact else path.startswith(prefix):
                if req.method not in methods:
                    raise _HTTPError(405, f"method {req.method} not allowed")
                arg = path[len(prefix) :]
                return handler(req, arg)
        raise _HTTPError(404, "404 page not found\n")

    def _routes(self) -> list[tuple[str, bool, tuple[str, ...], Any]]:
        get, put = ("GET",), ("PUT",)
        return [
            ("/v1/kv/", False, ("GET", "PUT", "DELETE"), self._h_kv),
            ("/v1/agent/self", True, get, self._h_agent_self),
            ("/v1/agent/members", True, get, self._h_agent_members),
            ("/v1/agent/services", True, get, self._h_agent_services),
            ("/v1/agent/service/register", True, put, self._h_service_register),
            ("/v1/agent/service/deregister/", False, put, self._h_service_deregister),
            ("/v1/agent/service/", False, get, self._h_agent_service),
            ("/v1/agent/checks", True, get, self._h_agent_checks),
            ("/v1/agent/check/register", True, put, self._h_check_register),
            ("/v1/agent/check/deregister/", False, put, self._h_check_deregister),
            ("/v1/agent/check/pass/", False, put, self._h_check_pass),
            ("/v1/agent/check/warn/", False, put, self._h_check_warn),
            ("/v1/agent/check/fail/", False, put, self._h_check_fail),
            ("/v1/agent/check/update/", False, put, self._h_check_update),
            ("/v1/health/service/", False, get, self._h_health_service),
            ("/v1/health/checks/", False, get, self._h_health_checks),
            ("/v1/health/state/", False, get, self._h_health_state),
            ("/v1/health/node/", False, get, self._h_health_node),
            ("/v1/catalog/services", True, get, self._h_catalog_services),
            ("/v1/catalog/service/", False, get, self._h_catalog_service),
            ("/v1/catalog/nodes", True, get, self._h_catalog_nodes),
            ("/v1/catalog/datacenters", True, get, self._h_catalog_datacenters),
            ("/v1/session/create", True, put, self._h_session_create),
            ("/v1/session/destroy/", False, put, self._h_session_destroy),
            ("/v1/session/renew/", False, put, self._h_session_renew),
            ("/v1/session/info/", False, get, self._h_session_info),
            ("/v1/session/list", True, get, self._h_session_list),
            ("/v1/session/node/", False, get, self._h_session_node),
            ("/v1/status/leader", True, get, self._h_status_leader),
            ("/v1/status/peers", True, get, self._h_status_peers),
        ]

    def _check_acl(self, req: _Request) -> None:
        token = _qget(req.query, "token") or req.headers.get("X-Consul-Token") or ""
        if not token:
            auth = req.headers.get("Authorization") or ""
            if auth[:7].lower() == "bearer ":
                token = auth[7:].strip()
        if not token:
            raise _HTTPError(403, "Permission denied")
        assert self._token is not None
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            raise _HTTPError(403, "ACL not found")

    # -- response helpers ----------------------------------------------------------------------

    @staticmethod
    def _json(req: _Request, obj: Any, status: int = 200, index: int | None = None) -> _Response:
        headers = {}
        if index is not None:
            headers = _meta_headers(index)
        return _Response(status, _go_json(obj, "pretty" in req.query), "application/json", headers)

    def _parse_query_options(self, req: _Request) -> tuple[int, float]:
        """parseDC/parseConsistency/parseWait; returns (min index, max query time)."""
        dc = _qget(req.query, "dc")
        if dc and dc != self.datacenter:
            raise _HTTPError(500, "No path to datacenter")
        if "stale" in req.query and "consistent" in req.query:
            raise _HTTPError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        if _qget(req.query, "filter"):
            raise _HTTPError(400, "filter expressions are not supported by the Consul emulator")
        wait = 0.0
        raw_wait = _qget(req.query, "wait")
        if raw_wait:
            try:
                wait = parse_go_duration(raw_wait)
            except ValueError:
                raise _HTTPError(400, "Invalid wait time") from None
        min_index = 0
        raw_index = _qget(req.query, "index")
        if raw_index:
            if not raw_index.isdigit():
                raise _HTTPError(400, "Invalid index")
            min_index = int(raw_index)
        return min_index, wait

    def _blocking(self, options: tuple[int, float], query: Any, matches: Any) -> tuple[int, Any]:
        """blockingquery.Query: run *query* (under the lock) until its index > min index."""
        min_index, wait = options
        if min_index == 0:
            with self._lock:
                index, result = query()
            return max(index, 1), result
        if wait <= 0:
            wait = _DEFAULT_QUERY_TIME
        wait = min(wait, _MAX_QUERY_TIME)
        wait += random.uniform(0, wait / _JITTER_FRACTION)
        deadline = time.monotonic() + wait
        while True:
            waiter = _Waiter(matches)
            with self._lock:
                index, result = query()
                index = max(index, 1)
                if index > min_index or not self._running:
                    return index, result
                self._waiters.add(waiter)
            remaining = deadline - time.monotonic()
            fired = remaining > 0 and waiter.event.wait(remaining)
            with self._lock:
                self._waiters.discard(waiter)
            if not fired or not self._running:
                return index, result

    # -- KV endpoints --------------------------------------------------------------------------

    def _h_kv(self, req: _Request, key: str) -> _Response:
        options = self._parse_query_options(req)
        raw = req.raw_path
        if "../" in raw or "..\\" in raw:
            raise _HTTPError(400, "URL path contains invalid traversal sequence")
        if any(s in raw for s in (*_KV_ENCODED_TRAVERSAL, "%252e%252e%252f")):
            raise _HTTPError(400, "URL path contains encoded traversal sequence")
        if key:
            problem = validate_kv_key(key)
            if problem:
                raise _HTTPError(400, problem)
        if req.method == "GET":
            if "keys" in req.query:
                return self._kv_get_keys(req, key, options)
            return self._kv_get(req, key, options)
        if req.method == "PUT":
            return self._kv_put(req, key)
        return self._kv_delete(req, key)

    def _kv_get(self, req: _Request, key: str, options: tuple[int, float]) -> _Response:
        recurse = "recurse" in req.query
        if not recurse and key == "":
            raise _HTTPError(400, "Missing key name")
        if recurse:

            def query() -> tuple[int, list[_KVEntry]]:
                entries = sorted(
                    (e for k, e in self._kv.items() if k.startswith(key)), key=lambda e: e.key
                )
                return self._kv_list_index(key, entries), [replace(e) for e in entries]

            def matches(event: tuple[str, ...]) -> bool:
                return event[0] == "kv" and event[1].startswith(key)

        else:

            def query() -> tuple[int, list[_KVEntry]]:
                entry = self._kv.get(key)
                if entry is None:
                    return self._table("kvs", "tombstones"), []
                return entry.modify_index, [replace(entry)]

            def matches(event: tuple[str, ...]) -> bool:
                return event == ("kv", key)

        index, entries = self._blocking(options, query, matches)
        if not entries:
            return _Response(404, b"", None, _meta_headers(index))
        if "raw" in req.query and not recurse:
            headers = _meta_headers(index)
            headers["X-Content-Type-Options"] = "nosniff"
            headers["Content-Security-Policy"] = "sandbox"
            return _Response(200, entries[0].value or b"", "text/plain", headers)
        return self._json(req, [e.to_json() for e in entries], index=index)

    def _kv_get_keys(self, req: _Request, prefix: str, options: tuple[int, float]) -> _Response:
        separator = _qget(req.query, "separator")
        if separator is None:
            separator = _qget(req.query, "seperator") or ""

        def query() -> tuple[int, list[str]]:
            entries = sorted(
                (e for k, e in self._kv.items() if k.startswith(prefix)), key=lambda e: e.key
            )
            keys: list[str] = []
            seen: set[str] = set()
            for entry in entries:
                if not separator:
                    keys.append(entry.key)
                    continue
                after = entry.key[len(prefix) :]
                cut = after.find(separator)
                if cut > -1:
                    folded = entry.key[: len(prefix) + cut + len(separator)]
                    if folded not in seen:
                        seen.add(folded)
                        keys.append(folded)
                else:
                    keys.append(entry.key)
            return self._kv_list_index(prefix, entries), keys

        def matches(event: tuple[str, ...]) -> bool:
            return event[0] == "kv" and event[1].startswith(prefix)

        index, keys = self._blocking(options, query, matches)
        if not keys and prefix != "":
            return _Response(404, b"", None, _meta_headers(index))
        return self._json(req, keys, index=index)

    def _kv_put(self, req: _Request, key: str) -> _Response:
        if key == "":
            raise _HTTPError(400, "Missing key name")
        given = [f for f in ("cas", "acquire", "release") if f in req.query]
        if len(given) > 1:
            encoded = urllib.parse.urlencode(sorted(req.query.items()), doseq=True)
            raise _HTTPError(400, f"Conflicting flags: {encoded}\n")
        flags = 0
        if "flags" in req.query:
            flags = _parse_uint(_qget(req.query, "flags") or "")
        if len(req.body) > self.kv_max_value_size:
            raise _HTTPError(
                413,
                f"Request body({len(req.body)} bytes) too large, max size: "
                f"{self.kv_max_value_size} bytes. See "
                "https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size.",
            )
        value = req.body or None
        entry = _KVEntry(key=key, value=value, flags=flags)
        with self._lock:
            if "cas" in req.query:
                cas = _parse_uint(_qget(req.query, "cas") or "")
                idx = self._next_index()  # the CAS is decided in the state store, after raft
                existing = self._kv.get(key)
                if cas == 0 and existing is not None:
                    return self._json(req, False)
                if cas != 0 and (existing is None or existing.modify_index != cas):
                    return self._json(req, False)
                self._kvs_set_txn(idx, entry, update_session=False)
                return self._json(req, True)
            if "acquire" in req.query:
                return self._json(req, self._kv_lock(entry, _qget(req.query, "acquire") or ""))
            if "release" in req.query:
                return self._json(req, self._kv_unlock(entry, _qget(req.query, "release") or ""))
            idx = self._next_index()
            self._kvs_set_txn(idx, entry, update_session=False)
            return self._json(req, True)

    def _kv_lock(self, entry: _KVEntry, session: str) -> bool:
        """kvsPreApply lock-delay check, then kvsLockTxn."""
        expires = self._lock_delay.get(entry.key)
        if expires is not None and expires > time.monotonic():
            return False
        idx = self._next_index()
        if session == "":
            raise _HTTPError(500, "missing session")
        if session not in self._sessions:
            raise _HTTPError(500, f'invalid session "{session}"')
        existing = self._kv.get(entry.key)
        if existing is not None:
            if existing.session == session:
                entry.lock_index = existing.lock_index
            elif existing.session:
                return False
            else:
                entry.lock_index = existing.lock_index + 1
        else:
            entry.lock_index = 1
        entry.session = session
        self._kvs_set_txn(idx, entry, update_session=True)
        return True

    def _kv_unlock(self, entry: _KVEntry, session: str) -> bool:
        """kvsUnlockTxn."""
        idx = self._next_index()
        if session == "":
            raise _HTTPError(500, "missing session")
        existing = self._kv.get(entry.key)
        if existing is None or existing.session != session:
            return False
        entry.session = ""
        entry.lock_index = existing.lock_index
        self._kvs_set_txn(idx, entry, update_session=True)
        return True

    def _kv_delete(self, req: _Request, key: str) -> _Response:
        if "recurse" in req.query and "cas" in req.query:
            encoded = urllib.parse.urlencode(sorted(req.query.items()), doseq=True)
            raise _HTTPError(400, f"Conflicting flags: {encoded}\n")
        recurse = "recurse" in req.query
        if not recurse and key == "":
            raise _HTTPError(400, "Missing key name")
        with self._lock:
            if "cas" in req.query:
                cas = _parse_uint(_qget(req.query, "cas") or "")
                idx = self._next_index()
                existing = self._kv.get(key)
                if existing is None or existing.modify_index != cas:
                    return self._json(req, existing is None)
                self._kvs_delete_txn(idx, key)
                return self._json(req, True)
            idx = self._next_index()
            if recurse:
                for k in sorted(k for k in self._kv if k.startswith(key)):
                    self._kvs_delete_txn(idx, k)
            else:
                self._kvs_delete_txn(idx, key)
            return self._json(req, True)

    # -- agent endpoints -----------------------------------------------------------------------

    def _h_agent_self(self, req: _Request, _: str) -> _Response:
        member = self._member_json()
        return self._json(
            req,
            {
                "Config": {
                    "Datacenter": self.datacenter,
                    "PrimaryDatacenter": self.datacenter,
                    "NodeName": self.node_name,
                    "NodeID": self._node_id,
                    "Revision": "emulator",
                    "Server": True,
                    "Version": "1.22.0",
                    "BuildDate": "",
                },
                "Member": member,
                "Coord": None,
                "Stats": {},
                "Meta": {"consul-network-segment": ""},
                "DebugConfig": {},
                "xDS": None,
            },
        )

    def _member_json(self) -> dict[str, Any]:
        return {
            "Name": self.node_name,
            "Addr": self._host,
            "Port": 8301,
            "Tags": {
                "dc": self.datacenter,
                "role": "consul",
                "id": self._node_id,
                "port": "8300",
                "build": "1.22.0:emulator",
                "vsn": "2",
                "expect": "1",
            },
            "Status": 1,
            "ProtocolMin": 1,
            "ProtocolMax": 5,
            "ProtocolCur": 2,
            "DelegateMin": 2,
            "DelegateMax": 5,
            "DelegateCur": 4,
        }

    def _h_agent_members(self, req: _Request, _: str) -> _Response:
        return self._json(req, [self._member_json()])

    def _agent_service_json(self, svc: _Service) -> dict[str, Any]:
        return {
            "ID": svc.id,
            "Service": svc.name,
            "Tags": list(svc.tags),
            "Meta": dict(svc.meta),
            "Port": svc.port,
            "Address": svc.address,
            "Weights": dict(svc.weights),
            "EnableTagOverride": svc.enable_tag_override,
            "Datacenter": self.datacenter,
        }

    def _h_agent_services(self, req: _Request, _: str) -> _Response:
        with self._lock:
            out = {s.id: self._agent_service_json(s) for s in self._services.values() if s.agent}
        return self._json(req, out)

    def _h_agent_service(self, req: _Request, sid: str) -> _Response:
        with self._lock:
            svc = self._services.get(sid)
            if svc is None or not svc.agent:
                raise _HTTPError(404, f"unknown service ID: {sid}")
            return self._json(req, self._agent_service_json(svc))

    def _check_json(self, check: _Check, catalog: bool) -> dict[str, Any]:
        out = {
            "Node": self.node_name,
            "CheckID": check.id,
            "Name": check.name,
            "Status": check.cat_status if catalog else check.status,
            "Notes": check.notes,
            "Output": check.cat_output if catalog else check.output,
            "ServiceID": check.service_id,
            "ServiceName": check.service_name,
            "ServiceTags": list(check.service_tags),
            "Type": check.kind if check.kind in ("http", "tcp", "ttl") else "",
            "Definition": check.definition.definition_json(),
        }
        if catalog:
            out["CreateIndex"] = check.create_index
            out["ModifyIndex"] = check.modify_index
        return out

    def _h_agent_checks(self, req: _Request, _: str) -> _Response:
        with self._lock:
            out = {c.id: self._check_json(c, False) for c in self._checks.values() if c.agent}
        return self._json(req, out)

    def _decode_body(self, req: _Request) -> Any:
        try:
            return json.loads(req.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _HTTPError(400, f"Request decode failed: {exc}") from None

    def _parse_check_type(self, raw: Any, context: str) -> _CheckDef:
        if not isinstance(raw, dict):
            raise _HTTPError(400, f"Request decode failed: {context}: expected a JSON object")
        try:
            interval = _duration_field(_get(raw, "Interval"), "Interval")
            timeout = _duration_field(_get(raw, "Timeout"), "Timeout")
            ttl = _duration_field(_get(raw, "TTL"), "TTL")
            deregister = _duration_field(
                _get(raw, "DeregisterCriticalServiceAfter"), "DeregisterCriticalServiceAfter"
            )
        except ValueError as exc:
            raise _HTTPError(400, f"Request decode failed: {exc}") from None
        header = _get(raw, "Header") or {}
        definition = _CheckDef(
            check_id=str(_get(raw, "CheckID", "ID") or ""),
            name=str(_get(raw, "Name") or ""),
            status=str(_get(raw, "Status") or ""),
            notes=str(_get(raw, "Notes") or ""),
            http=str(_get(raw, "HTTP") or ""),
            method=str(_get(raw, "Method") or ""),
            header={
                str(k): list(v) if isinstance(v, list) else [str(v)] for k, v in header.items()
            },
            body=str(_get(raw, "Body") or ""),
            tcp=str(_get(raw, "TCP") or ""),
            interval=interval,
            timeout=timeout,
            ttl=ttl,
            deregister_after=deregister,
            tls_skip_verify=bool(_get(raw, "TLSSkipVerify") or False),
            output_max_size=int(_get(raw, "OutputMaxSize") or _OUTPUT_MAX_SIZE),
            success_before_passing=int(_get(raw, "SuccessBeforePassing") or 0),
            failures_before_critical=int(_get(raw, "FailuresBeforeCritical") or 0),
            service_id=str(_get(raw, "ServiceID") or ""),
        )
        script = _get(raw, "Args", "ScriptArgs", "Script")
        unsupported = [
            name
            for name in ("GRPC", "H2PING", "UDP", "DockerContainerID", "OSService")
            if _get(raw, name)
        ]
        alias = bool(_get(raw, "AliasNode") or _get(raw, "AliasService"))
        interval_check = bool(script or definition.http or definition.tcp or unsupported)
        if definition.interval > 0 and definition.ttl > 0:
            raise _HTTPError(400, "Invalid check: Interval and TTL cannot both be specified")
        if interval_check and definition.interval <= 0:
            raise _HTTPError(
                400,
                "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP or UDP checks",
            )
        if not interval_check and not alias and definition.ttl <= 0:
            raise _HTTPError(400, "Invalid check: TTL must be > 0 for TTL checks")
        if definition.output_max_size < 0:
            raise _HTTPError(400, "Invalid check: MaxOutputMaxSize must be positive")
        if definition.status and definition.status not in _STATUSES:
            raise _HTTPError(400, "Status for checks must 'passing', 'warning', 'critical'")
        if script:
            definition.kind = "script"
        elif unsupported or alias:
            kinds = ", ".join(unsupported) or "alias"
            raise _HTTPError(400, f"the Consul emulator does not run {kinds} checks")
        elif definition.http:
            definition.kind = "http"
        elif definition.tcp:
            definition.kind = "tcp"
        else:
            definition.kind = "ttl"
        return definition

    @staticmethod
    def _check_empty(raw: Any) -> bool:
        return not raw or (isinstance(raw, dict) and not any(v for v in raw.values()))

    def _h_service_register(self, req: _Request, _: str) -> _Response:
        body = self._decode_body(req)
        if not isinstance(body, dict):
            raise _HTTPError(400, "Request decode failed: expected a JSON object")
        name = str(_get(body, "Name") or "")
        if not name:
            raise _HTTPError(400, "Missing service name")
        address = str(_get(body, "Address") or "")
        if address in ("0.0.0.0", "::", "[::]"):
            raise _HTTPError(400, "Invalid service address")
        meta = _get(body, "Meta") or {}
        if not isinstance(meta, dict):
            raise _HTTPError(400, "Request decode failed: Meta must be an object")
        _validate_meta(meta)
        weights_raw = _get(body, "Weights")
        weights = {"Passing": 1, "Warning": 1}
        if isinstance(weights_raw, dict):
            weights = {
                "Passing": int(_get(weights_raw, "Passing") or 0),
                "Warning": int(_get(weights_raw, "Warning") or 0),
            }
            if weights["Passing"] < 1:
                raise _HTTPError(400, "Invalid Weights: Passing must be greater than 0")
        try:
            port = int(_get(body, "Port") or 0)
        except (TypeError, ValueError):
            raise _HTTPError(400, "Request decode failed: Port must be a number") from None
        svc = _Service(
            id=str(_get(body, "ID") or name),
            name=name,
            tags=[str(t) for t in (_get(body, "Tags") or [])],
            address=address,
            port=port,
            meta={str(k): str(v) for k, v in meta.items()},
            weights=weights,
            enable_tag_override=bool(_get(body, "EnableTagOverride") or False),
        )
        raw_checks: list[Any] = []
        single = _get(body, "Check")
        if not self._check_empty(single):
            raw_checks.append(single)
        raw_checks.extend(_get(body, "Checks") or [])
        definitions = [self._parse_check_type(c, "Checks") for c in raw_checks]
        if any(d.kind == "script" for d in definitions):
            raise _HTTPError(
                500,
                "Scripts are disabled on this agent; to enable, configure "
                "'enable_script_checks' or 'enable_local_script_checks' to true",
            )
        replace_existing = "replace-existing-checks" in req.query and (
            _qget(req.query, "replace-existing-checks") in ("", "true")
        )
        with self._lock:
            self._agent_add_service(svc, definitions, replace_existing)
        return _Response(200)

    def _new_check(self, definition: _CheckDef, check_id: str, svc: _Service | None) -> _Check:
        name = definition.name or (f"Service '{svc.name}' check" if svc else check_id)
        check = _Check(
            id=check_id,
            name=name,
            kind=definition.kind,
            notes=definition.notes,
            service_id=svc.id if svc else "",
            service_name=svc.name if svc else "",
            service_tags=list(svc.tags) if svc else [],
            definition=definition,
            status=definition.status or CRITICAL,
        )
        previous = self._checks.get(check_id)
        if previous is not None and previous.agent:
            # addServiceInternal: "Restore the fields from the snapshot."
            check.status, check.output = previous.status, previous.output
            check.critical_since = previous.critical_since
            check.in_catalog, check.catalog_view = previous.in_catalog, previous.catalog_view
            check.cat_status, check.cat_output = previous.cat_status, previous.cat_output
            check.create_index, check.modify_index = previous.create_index, previous.modify_index
            check.last_ttl_output = previous.last_ttl_output
        if check.status == CRITICAL and check.critical_since is None:
            check.critical_since = time.monotonic()
        return check

    def _agent_add_service(
        self, svc: _Service, definitions: list[_CheckDef], replace_existing: bool
    ) -> None:
        new_checks = []
        for position, definition in enumerate(definitions):
            check_id = definition.check_id
            if not check_id:
                check_id = f"service:{svc.id}"
                if len(definitions) > 1:
                    check_id += f":{position + 1}"
            new_checks.append(self._new_check(definition, check_id, svc))
        new_ids = {c.id for c in new_checks}
        idx = self._next_index()
        self._catalog_put_service(svc, idx)
        for check in list(self._checks.values()):
            if check.service_id != svc.id or not check.agent:
                continue
            if check.id in new_ids or replace_existing:
                self._stop_runner(check)
                if check.id not in new_ids:
                    self._catalog_remove_check(check, idx)
            else:
                check.service_tags = list(svc.tags)
                check.service_name = svc.name
                self._catalog_sync_check(check, idx)
        for check in new_checks:
            self._install_check(check, idx)

    def _install_check(self, check: _Check, idx: int) -> None:
        old = self._checks.get(check.id)
        if old is not None:
            self._stop_runner(old)
        self._checks[check.id] = check
        if check.definition.kind == "ttl":
            check.ttl_deadline = time.monotonic() + check.definition.ttl
        self._catalog_sync_check(check, idx)
        self._start_runner(check)

    def _h_service_deregister(self, req: _Request, sid: str) -> _Response:
        with self._lock:
            svc = self._services.get(sid)
            if svc is None or not svc.agent:
                raise _HTTPError(
                    404,
                    f'Unknown service ID "{sid}". Ensure that the service ID is passed, '
                    "not the service name.",
                )
            self._catalog_remove_service(sid, self._next_index())
        return _Response(200)

    def _h_check_register(self, req: _Request, _: str) -> _Response:
        body = self._decode_body(req)
        if not isinstance(body, dict):
            raise _HTTPError(400, "Request decode failed: expected a JSON object")
        if not _get(body, "Name"):
            raise _HTTPError(400, "Missing check name")
        definition = self._parse_check_type(body, "check")
        if definition.kind == "script":
            raise _HTTPError(
                500,
                "Scripts are disabled on this agent; to enable, configure "
                "'enable_script_checks' or 'enable_local_script_checks' to true",
            )
        check_id = definition.check_id or definition.name
        with self._lock:
            svc = None
            if definition.service_id:
                svc = self._services.get(definition.service_id)
                if svc is None or not svc.agent:
                    raise _HTTPError(
                        500,
                        f'ServiceID "{definition.service_id}" does not exist',
                    )
            check = self._new_check(definition, check_id, svc)
            self._install_check(check, self._next_index())
        return _Response(200)

    def _agent_check(self, check_id: str) -> _Check:
        check = self._checks.get(check_id)
        if check is None or not check.agent:
            raise _HTTPError(
                404,
                f'Unknown check ID "{check_id}". Ensure that the check ID is passed, '
                "not the check name.",
            )
        return check

    def _h_check_deregister(self, req: _Request, check_id: str) -> _Response:
        with self._lock:
            check = self._agent_check(check_id)
            self._catalog_remove_check(check, self._next_index())
        return _Response(200)

    def _ttl_update(self, check_id: str, status: str, output: str) -> _Response:
        with self._lock:
            check = self._agent_check(check_id)
            if check.definition.kind != "ttl":
                raise _HTTPError(500, f'CheckID "{check_id}" does not have associated TTL')
            limit = check.definition.output_max_size
            if len(output) > limit:
                output = f"{output[:limit]} ... (captured {limit} of {len(output)} bytes)"
            self._update_check(check, status, output)
            check.last_ttl_output = output
            check.ttl_deadline = time.monotonic() + check.definition.ttl
        return _Response(200)

    def _h_check_pass(self, req: _Request, check_id: str) -> _Response:
        return self._ttl_update(check_id, PASSING, _qget(req.query, "note") or "")

    def _h_check_warn(self, req: _Request, check_id: str) -> _Response:
        return self._ttl_update(check_id, WARNING, _qget(req.query, "note") or "")

    def _h_check_fail(self, req: _Request, check_id: str) -> _Response:
        return self._ttl_update(check_id, CRITICAL, _qget(req.query, "note") or "")

    def _h_check_update(self, req: _Request, check_id: str) -> _Response:
        body = self._decode_body(req) if req.body.strip() else {}
        if not isinstance(body, dict):
            raise _HTTPError(400, "Request decode failed: expected a JSON object")
        status = str(_get(body, "Status") or "")
        if status not in _STATUSES:
            raise _HTTPError(400, f"Invalid check status: '{status}'")
        return self._ttl_update(check_id, status, str(_get(body, "Output") or ""))

    # -- health and catalog --------------------------------------------------------------------

    def _node_json(self) -> dict[str, Any]:
        return {
            "ID": self._node_id,
            "Node": self.node_name,
            "Address": self._host,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {
                "lan": self._host,
                "lan_ipv4": self._host,
                "wan": self._host,
                "wan_ipv4": self._host,
            },
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": self._node_index,
            "ModifyIndex": self._node_index,
        }

    def _node_meta_ok(self, req: _Request) -> bool:
        meta = self._node_json()["Meta"]
        for pair in req.query.get("node-meta", []):
            key, _, value = pair.partition(":")
            if meta.get(key) != value:
                return False
        return True

    def _service_index(self, name: str) -> int:
        if self._service_exists(name):
            index = self._tables.get(f"service.{name}")
            if index:
                return index
        else:
            extinct = self._tables.get("service_last_extinction")
            if extinct:
                return extinct
        return self._table("nodes", "services", "checks")

    def _instances(self, req: _Request, name: str) -> list[_Service]:
        tags = req.query.get("tag", [])
        if not self._node_meta_ok(req):
            return []
        return sorted(
            (
                s
                for s in self._services.values()
                if s.name == name and all(t in s.tags for t in tags)
            ),
            key=lambda s: s.id,
        )

    def _h_health_service(self, req: _Request, name: str) -> _Response:
        options = self._parse_query_options(req)
        passing_only = _qbool(req.query, "passing")

        def query() -> tuple[int, list[dict[str, Any]]]:
            entries = []
            for svc in self._instances(req, name):
                checks = [
                    c
                    for c in self._checks.values()
                    if c.in_catalog and (c.service_id == svc.id or not c.service_id)
                ]
                # parseCheckServiceNodes: the node's checks first, then the service's
                checks.sort(key=lambda c: (c.service_id != "", c.id))
                if passing_only and any(c.cat_status != PASSING for c in checks):
                    continue
                entries.append(
                    {
                        "Node": self._node_json(),
                        "Service": {
                            "ID": svc.id,
                            "Service": svc.name,
                            "Tags": list(svc.tags),
                            "Address": svc.address,
                            "Meta": dict(svc.meta),
                            "Port": svc.port,
                            "Weights": dict(svc.weights),
                            "EnableTagOverride": svc.enable_tag_override,
                            "CreateIndex": svc.create_index,
                            "ModifyIndex": svc.modify_index,
                        },
                        "Checks": [self._check_json(c, True) for c in checks],
                    }
                )
            return self._service_index(name), entries

        index, entries = self._blocking(options, query, lambda event: event == ("service", name))
        return self._json(req, entries, index=index)

    def _h_health_checks(self, req: _Request, name: str) -> _Response:
        options = self._parse_query_options(req)

        def query() -> tuple[int, list[dict[str, Any]]]:
            ids = {s.id for s in self._services.values() if s.name == name}
            checks = sorted(
                (c for c in self._checks.values() if c.in_catalog and c.service_id in ids),
                key=lambda c: c.id,
            )
            if not self._node_meta_ok(req):
                checks = []
            return self._table("checks"), [self._check_json(c, True) for c in checks]

        index, checks = self._blocking(options, query, lambda event: event == ("service", name))
        return self._json(req, checks, index=index)

    def _h_health_state(self, req: _Request, state: str) -> _Response:
        if state not in ("any", *_STATUSES):
            raise _HTTPError(400, "Invalid check state")
        options = self._parse_query_options(req)

        def query() -> tuple[int, list[dict[str, Any]]]:
            checks = sorted(
                (
                    c
                    for c in self._checks.values()
                    if c.in_catalog and (state == "any" or c.cat_status == state)
                ),
                key=lambda c: c.id,
            )
            if not self._node_meta_ok(req):
                checks = []
            return self._table("checks"), [self._check_json(c, True) for c in checks]

        index, checks = self._blocking(options, query, lambda event: event[0] == "checks")
        return self._json(req, checks, index=index)

    def _h_health_node(self, req: _Request, node: str) -> _Response:
        options = self._parse_query_options(req)

        def query() -> tuple[int, list[dict[str, Any]]]:
            if node != self.node_name:
                return self._table("checks"), []
            checks = sorted((c for c in self._checks.values() if c.in_catalog), key=lambda c: c.id)
            return self._table("checks"), [self._check_json(c, True) for c in checks]

        index, checks = self._blocking(options, query, lambda event: event[0] == "checks")
        return self._json(req, checks, index=index)

    def _h_catalog_services(self, req: _Request, _: str) -> _Response:
        options = self._parse_query_options(req)

        def query() -> tuple[int, dict[str, list[str]]]:
            out: dict[str, list[str]] = {}
            if self._node_meta_ok(req):
                for svc in sorted(self._services.values(), key=lambda s: s.id):
                    tags = out.setdefault(svc.name, [])
                    tags.extend(t for t in svc.tags if t not in tags)
            return self._table("services"), out

        index, out = self._blocking(options, query, lambda event: event[0] == "services")
        return self._json(req, out, index=index)

    def _h_catalog_service(self, req: _Request, name: str) -> _Response:
        options = self._parse_query_options(req)

        def query() -> tuple[int, list[dict[str, Any]]]:
            node = self._node_json()
            out = []
            for svc in self._instances(req, name):
                out.append(
                    {
                        "ID": node["ID"],
                        "Node": node["Node"],
                        "Address": node["Address"],
                        "Datacenter": node["Datacenter"],
                        "TaggedAddresses": node["TaggedAddresses"],
                        "NodeMeta": node["Meta"],
                        "ServiceKind": "",
                        "ServiceID": svc.id,
                        "ServiceName": svc.name,
                        "ServiceTags": list(svc.tags),
                        "ServiceAddress": svc.address,
                        "ServiceWeights": dict(svc.weights),
                        "ServiceMeta": dict(svc.meta),
                        "ServicePort": svc.port,
                        "ServiceEnableTagOverride": svc.enable_tag_override,
                        "CreateIndex": svc.create_index,
                        "ModifyIndex": svc.modify_index,
                    }
                )
            return self._service_index(name), out

        index, out = self._blocking(options, query, lambda event: event == ("service", name))
        return self._json(req, out, index=index)

    def _h_catalog_nodes(self, req: _Request, _: str) -> _Response:
        options = self._parse_query_options(req)

        def query() -> tuple[int, list[dict[str, Any]]]:
            nodes = [self._node_json()] if self._node_meta_ok(req) else []
            return self._table("nodes"), nodes

        index, nodes = self._blocking(options, query, lambda event: event[0] == "nodes")
        return self._json(req, nodes, index=index)

    def _h_catalog_datacenters(self, req: _Request, _: str) -> _Response:
        return self._json(req, [self.datacenter])

    # -- sessions ------------------------------------------------------------------------------

    def _h_session_create(self, req: _Request, _: str) -> _Response:
        dc = _qget(req.query, "dc")
        if dc and dc != self.datacenter:
            raise _HTTPError(500, "No path to datacenter")
        body: Any = {}
        if req.body.strip():
            body = self._decode_body(req)
            if not isinstance(body, dict):
                raise _HTTPError(400, "Request decode failed: expected a JSON object")
        node = str(_get(body, "Node") or self.node_name)
        node_checks = [SERF_CHECK_ID]
        if _has(body, "Checks"):
            node_checks = [str(c) for c in (_get(body, "Checks") or [])]
        node_checks += [str(c) for c in (_get(body, "NodeChecks") or [])]
        service_checks = []
        for item in _get(body, "ServiceChecks") or []:
            if isinstance(item, dict):
                service_checks.append(str(_get(item, "ID") or ""))
        lock_delay = 15.0
        if _has(body, "LockDelay"):
            lock_delay = _session_lock_delay(_get(body, "LockDelay"))
        behavior = str(_get(body, "Behavior") or "release")
        if behavior not in ("release", "delete"):
            raise _HTTPError(500, f"Invalid Behavior setting '{behavior}'")
        ttl = str(_get(body, "TTL") or "")
        ttl_seconds = 0.0
        if ttl:
            try:
                ttl_seconds = parse_go_duration(ttl)
            except ValueError as exc:
                raise _HTTPError(500, f"Session TTL '{ttl}' invalid: {exc}") from None
            if ttl_seconds != 0 and not (self.session_ttl_min <= ttl_seconds <= _SESSION_TTL_MAX):
                raise _HTTPError(
                    500,
                    f"Invalid Session TTL '{round(ttl_seconds * 1e9)}', must be between "
                    f"[{format_go_duration(self.session_ttl_min)}="
                    f"{format_go_duration(_SESSION_TTL_MAX)}]",
                )
        with self._lock:
            if node != self.node_name:
                raise _HTTPError(500, "Missing node registration")
            for check_id in [*node_checks, *service_checks]:
                check = self._checks.get(check_id)
                if check is None or not check.in_catalog:
                    raise _HTTPError(500, f"Missing check '{check_id}' registration")
                if check.cat_status == CRITICAL:
                    raise _HTTPError(500, f"Check '{check_id}' is in critical state")
            idx = self._next_index()
            sess = _Session(
                id=str(uuid.uuid4()),
                name=str(_get(body, "Name") or ""),
                node=node,
                lock_delay=lock_delay,
                behavior=behavior,
                ttl=ttl,
                ttl_seconds=ttl_seconds,
                node_checks=node_checks,
                service_checks=service_checks,
                create_index=idx,
                modify_index=idx,
            )
            self._sessions[sess.id] = sess
            self._reset_session_timer(sess, time.monotonic())
            self._tables["sessions"] = idx
            self._emit("session", sess.id)
        return self._json(req, {"ID": sess.id})

    def _h_session_destroy(self, req: _Request, sid: str) -> _Response:
        if not sid:
            raise _HTTPError(400, "Missing session")
        with self._lock:
            idx = self._next_index()
            self._destroy_session(sid, idx)
        return self._json(req, True)

    def _h_session_renew(self, req: _Request, sid: str) -> _Response:
        self._parse_query_options(req)
        if not sid:
            raise _HTTPError(400, "Missing session")
        with self._lock:
            sess = self._sessions.get(sid)
            if sess is None:
                raise _HTTPError(404, f"Session id '{sid}' not found")
            self._reset_session_timer(sess, time.monotonic())
            return self._json(req, [sess.to_json()])

    def _h_session_info(self, req: _Request, sid: str) -> _Response:
        options = self._parse_query_options(req)
        if not sid:
            raise _HTTPError(400, "Missing session")

        def query() -> tuple[int, list[dict[str, Any]]]:
            sess = self._sessions.get(sid)
            return self._table("sessions"), [sess.to_json()] if sess else []

        index, out = self._blocking(options, query, lambda event: event == ("session", sid))
        return self._json(req, out, index=index)

    def _h_session_list(self, req: _Request, _: str) -> _Response:
        options = self._parse_query_options(req)

        def query() -> tuple[int, list[dict[str, Any]]]:
            sessions = sorted(self._sessions.values(), key=lambda s: s.create_index)
            return self._table("sessions"), [s.to_json() for s in sessions]

        index, out = self._blocking(options, query, lambda event: event[0] == "session")
        return self._json(req, out, index=index)

    def _h_session_node(self, req: _Request, node: str) -> _Response:
        options = self._parse_query_options(req)
        if not node:
            raise _HTTPError(400, "Missing node name")

        def query() -> tuple[int, list[dict[str, Any]]]:
            sessions = sorted(
                (s for s in self._sessions.values() if s.node == node),
                key=lambda s: s.create_index,
            )
            return self._table("sessions"), [s.to_json() for s in sessions]

        index, out = self._blocking(options, query, lambda event: event[0] == "session")
        return self._json(req, out, index=index)

    # -- status --------------------------------------------------------------------------------

    def _h_status_leader(self, req: _Request, _: str) -> _Response:
        return self._json(req, f"{self._host}:8300")

    def _h_status_peers(self, req: _Request, _: str) -> _Response:
        return self._json(req, [f"{self._host}:8300"])


def _meta_headers(index: int) -> dict[str, str]:
    return {
        "X-Consul-Index": str(max(index, 1)),
        "X-Consul-KnownLeader": "true",
        "X-Consul-LastContact": "0",
        "X-Consul-Effective-Consistency": "leader",
    }


def _validate_meta(meta: dict[str, Any]) -> None:
    """structs.ValidateServiceMetadata (the rules that apply to a plain service)."""
    if len(meta) > 64:
        raise _HTTPError(
            400, "Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs"
        )
    for key, value in meta.items():
        problem = ""
        if key == "":
            problem = "Key cannot be blank"
        elif not _META_KEY_RE.match(str(key)):
            problem = "Key contains invalid characters"
        elif len(str(key)) > 128:
            problem = "Key is too long (limit: 128 characters)"
        elif str(key).startswith("consul-"):
            problem = "Key prefix 'consul-' is reserved for internal use"
        elif len(str(value)) > 512:
            problem = "Value is too long (limit: 512 characters)"
        if problem:
            raise _HTTPError(
                400,
                f"Invalid Service Meta: Couldn't load metadata pair ('{key}', '{value}'): "
                f"{problem}",
            )


def _session_lock_delay(value: Any) -> float:
    """agent.FixupLockDelay: a duration string or a number; values < 1000 (ns) are seconds."""
    if isinstance(value, str):
        try:
            seconds = parse_go_duration(value)
        except ValueError as exc:
            raise _HTTPError(400, f"Request decode failed: {exc}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value) / 1e9
    else:
        raise _HTTPError(400, f"Request decode failed: invalid LockDelay {value!r}")
    if seconds * 1e9 < _LOCK_DELAY_MIN_THRESHOLD_NS:
        seconds = seconds * 1e9
    return seconds
