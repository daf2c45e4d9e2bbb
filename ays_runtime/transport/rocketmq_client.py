"""The boundary with rocketmq-python-client (RocketMQ 5, gRPC to a proxy): names, the client's
log file, sending, receiving, probing topics, and its errors translated into ours.

Names (one place, used by the manager, the nodes and installConfig's preflight)::

    <topic_prefix><group>          group topic: each job of the group, consumed by the
                                   consumer group <topic_prefix><group> (one node takes it)
    <topic_prefix><group>_bcast    broadcast topic: one message per shard, tagged
                                   n_<node ip>_<port>; each node consumes it with its own
                                   consumer group <topic_prefix><group>_bcast_<ip>_<port>
                                   filtered on its own tag
    <result_topic>                 results of every group, consumed by <topic_prefix>manager

The client writes its own log file under ``~/logs/rocketmq_python`` when it is imported; Ays
imports it through `load_client(log_dir)`, which keeps that file inside Ays's log directory
(``<log_dir>/rocketmq_client.log``, 20 MB x 5) and never creates anything in the home
directory. Only the client's threads log there; our own lines about the proxy go to Ays's log.

Errors: every client or gRPC error leaves this module as `TransientTransportError` (the proxy
is unreachable, slow or busy: try again later) or `TransportError` (a missing topic, a bad
request, refused credentials: trying again will not help; the message says what to fix).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import logging.handlers
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ays_runtime.config import RocketMQTransportSettings
from ays_runtime.exceptions import ConfigError, TransientTransportError, TransportError

if TYPE_CHECKING:  # imported for real by load_client(), which sets up its log first
    from rocketmq import ClientConfiguration, Message

log = logging.getLogger("ays.transport.rocketmq")

CLIENT_LOG = "rocketmq_client.log"
CLIENT_LOGGER = "rocketmq-python-client"  # the client's own logger name
CLIENT_LOG_BYTES = 20 * 1024 * 1024
CLIENT_LOG_BACKUPS = 5
REQUEST_TIMEOUT = 3  # seconds per RPC (the client's default)
PROBE_TIMEOUT = 5.0
# The proxy's validators: topic and consumer group names.
NAME = re.compile(r"^[%a-zA-Z0-9_-]+$")
TOPIC_MAX = 127
# Rebuild a consumer after this many failed receives in a row: a proxy that came back from
# an outage has forgotten the client's settings, which this client only resends every 5 min.
REBUILD_AFTER = 2

# The client's heartbeat callbacks re-raise a failed call, so concurrent.futures logs a
# traceback every 10 s while the proxy is away: a gap longer than this ends an "outage".
CALLBACK_OUTAGE_GAP = 60.0

_load_lock = threading.Lock()
_routed_to: Path | None = None


# --- names -------------------------------------------------------------------------------------


def group_topic(settings: RocketMQTransportSettings, group: str) -> str:
    return f"{settings.topic_prefix}{group}"


def broadcast_topic(settings: RocketMQTransportSettings, group: str) -> str:
    return f"{settings.topic_prefix}{group}_bcast"


def group_consumer(settings: RocketMQTransportSettings, group: str) -> str:
    return f"{settings.topic_prefix}{group}"


def node_tag(address: str) -> str:
    """The broadcast tag of the node at `address` (ip:port)."""
    return "n_" + re.sub(r"[^A-Za-z0-9_-]", "_", address.strip("[]").replace("]:", ":"))


def node_consumer(settings: RocketMQTransportSettings, group: str, address: str) -> str:
    return f"{broadcast_topic(settings, group)}_{node_tag(address)[2:]}"


def manager_consumer(settings: RocketMQTransportSettings) -> str:
    return f"{settings.topic_prefix}manager"


def role_topics(settings: RocketMQTransportSettings, groups: Iterable[str]) -> list[str]:
    """The topics used with `groups`: each group's two, and the result topic (a manager's
    groups are all the node groups; a node's, its own)."""
    topics: list[str] = []
    for group in groups:
        topics += [group_topic(settings, group), broadcast_topic(settings, group)]
    return [*topics, settings.result_topic]


def check_names(settings: RocketMQTransportSettings, group: str, where: str) -> None:
    """Raise ConfigError when `group` cannot be part of a topic or consumer group name."""
    for name in (group_topic(settings, group), broadcast_topic(settings, group)):
        if not NAME.match(name) or len(name) > TOPIC_MAX:
            raise ConfigError(
                f"{where}: node group {group!r} makes RocketMQ topic {name!r}, which is not "
                f"a valid topic name (letters, digits, '_', '-', '%'; at most {TOPIC_MAX}); "
                "choose a group name of letters, digits, '_' or '-'"
            )


def mqadmin_command(settings: RocketMQTransportSettings, topic: str) -> str:
    """The command that creates `topic` (as printed for an operator to run)."""
    name_server = settings.name_server or "<name-server-host>:9876"
    full = f"{settings.namespace}%{topic}" if settings.namespace else topic
    return f"mqadmin updateTopic -n {name_server} -c {settings.cluster} -t {full}"


# --- the client itself --------------------------------------------------------------------------


def load_client(log_dir: str | Path, who: str = "rocketmq client") -> None:
    """Import rocketmq-python-client with its log file in `log_dir` (created if needed).

    The client configures its logger at import time with a file under the home directory;
    the import runs with HOME pointing into `log_dir`, then the handler is replaced by one
    writing `log_dir/rocketmq_client.log` and the import's empty scratch file is removed.
    The tracebacks of the client's failing callbacks go there too (`CallbackFailures`),
    with one line per outage in Ays's log, said by `who`.
    """
    global _routed_to
    directory = Path(log_dir)
    with _load_lock:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"cannot create the log directory {directory} for the RocketMQ client's log: "
                f"{err.strerror or err}; set manager.log_dir / node.log_dir to a directory "
                "this user can write (installConfig creates it)"
            ) from None
        # Per process: two daemons sharing a log dir must not clean up each other's import.
        scratch = directory / f".rocketmq-client-home.{os.getpid()}"
        # gRPC's C core logs to stderr; keep its info lines (GOAWAY...) out of Ays's log.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        # gRPC's fork handlers restart its poller threads in every forked child; a node's job
        # shell, between fork and exec (closing fds), then dies now and then of the poller's
        # EBADF with SIGABRT (exit 134, ~1% of runs under load). The client never forks.
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        if "rocketmq.v5.log" not in sys.modules:
            home = os.environ.get("HOME")
            os.environ["HOME"] = str(scratch)
            try:
                import rocketmq  # noqa: F401 - configures the client's logger on import
            except ImportError as err:
                raise ConfigError(
                    f"transport backend rocketmq needs rocketmq-python-client ({err}); "
                    "install it with pip install 'ays[rocketmq]'"
                ) from None
            finally:
                if home is None:
                    os.environ.pop("HOME", None)
                else:
                    os.environ["HOME"] = home
        if _routed_to != directory:
            _route_client_log(directory)
            _routed_to = directory
        _callback_failures.who = who
        _callback_failures.client_log = directory / CLIENT_LOG
        futures_log = logging.getLogger("concurrent.futures")
        if _callback_failures not in futures_log.filters:
            futures_log.addFilter(_callback_failures)
        _remove_scratch(scratch)


class CallbackFailures(logging.Filter):
    """On the `concurrent.futures` logger: its "exception calling callback" records whose
    exception is gRPC's (the client's heartbeat callbacks re-raise them) are passed to the
    client's log instead of Ays's; Ays's log says once per outage that they happen."""

    def __init__(self) -> None:
        super().__init__()
        self.who = "rocketmq client"
        self.client_log = Path(CLIENT_LOG)
        self._last: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if err is None or not type(err).__module__.startswith("grpc"):
            return True
        logging.getLogger(CLIENT_LOGGER).handle(record)
        now = time.monotonic()
        if self._last is None or now - self._last > CALLBACK_OUTAGE_GAP:
            code = err.code() if hasattr(err, "code") else type(err).__name__
            log.warning(
                "%s: the RocketMQ client's calls to the proxy fail (%s); their tracebacks go "
                "to %s until it answers",
                self.who,
                getattr(code, "name", code),
                self.client_log,
            )
        self._last = now
        return False


_callback_failures = CallbackFailures()


def _route_client_log(directory: Path) -> None:
    client_log = logging.getLogger(CLIENT_LOGGER)
    for handler in list(client_log.handlers):
        client_log.removeHandler(handler)
        handler.close()
    handler = logging.handlers.RotatingFileHandler(
        directory / CLIENT_LOG,
        maxBytes=CLIENT_LOG_BYTES,
        backupCount=CLIENT_LOG_BACKUPS,
        encoding="utf-8",
        delay=True,
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    client_log.addHandler(handler)
    client_log.setLevel(logging.INFO)
    client_log.propagate = False


def _remove_scratch(scratch: Path) -> None:
    """Delete the empty file and folders the client's import made under the fake HOME."""
    if not scratch.exists():
        return
    for path in sorted(scratch.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()
            elif path.stat().st_size == 0:
                path.unlink()
    with contextlib.suppress(OSError):
        scratch.rmdir()


def client_configuration(settings: RocketMQTransportSettings) -> ClientConfiguration:
    from rocketmq import ClientConfiguration, Credentials

    endpoints = [e.strip() for e in settings.endpoints]
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(
                f"transport.endpoints: {endpoint!r} is not host:port (e.g. "
                "rocketmq-proxy.example.internal:8081)"
            )
    if len(endpoints) > 1 and not all(_is_ip(e.rpartition(":")[0]) for e in endpoints):
        raise ConfigError(
            f"transport.endpoints: {endpoints}: several endpoints must all be IP addresses "
            "(the client accepts one DNS name only); give one name, or the proxies' IPs"
        )
    secret = settings.secret_key.get_secret_value() if settings.secret_key else ""
    return ClientConfiguration(
        ";".join(endpoints),
        Credentials(settings.access_key or "", secret),
        namespace=settings.namespace,
        request_timeout=REQUEST_TIMEOUT,
    )


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


# --- errors ------------------------------------------------------------------------------------


def translate(err: BaseException, doing: str) -> TransportError:
    """Our error for a client or gRPC error raised while `doing` (e.g. "sending to topic t")."""
    import grpc
    from rocketmq.v5.exception import (
        BadRequestException,
        ClientException,
        ForbiddenException,
        NotFoundException,
        PayloadEmptyException,
        PayloadTooLargeException,
        UnauthorizedException,
        UnsupportedException,
    )

    if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
        code = err.code()
        details = err.details() if hasattr(err, "details") else ""
        name = code.name if code is not None else "UNKNOWN"
        return TransientTransportError(f"{doing}: proxy unreachable ({name}: {details})")
    if isinstance(err, UnauthorizedException | ForbiddenException):
        return TransportError(
            f"{doing}: the proxy refused the credentials ({err}); check transport.access_key "
            "and transport.secret_key, and the ACL of this key"
        )
    if isinstance(
        err,
        NotFoundException
        | BadRequestException
        | PayloadEmptyException
        | PayloadTooLargeException
        | UnsupportedException,
    ):
        return TransportError(f"{doing}: refused by the proxy: {err}")
    if isinstance(err, ClientException | concurrent.futures.TimeoutError | OSError):
        return TransientTransportError(f"{doing}: {type(err).__name__}: {err}")
    return TransientTransportError(f"{doing}: {type(err).__name__}: {err}")


# --- probing topics (installConfig's preflight; why a send failed) -----------------------------


@dataclass
class TopicProbe:
    """What one proxy endpoint said about some topics."""

    endpoint: str
    error: str = ""  # the endpoint could not be asked at all
    found: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # topic -> why it could not be checked


def probe_topics(
    settings: RocketMQTransportSettings, topics: Sequence[str], timeout: float = PROBE_TIMEOUT
) -> list[TopicProbe]:
    """Ask every endpoint for the route of every topic (QueryRoute). Blocking; never raises
    for a network or proxy error (it is in the result)."""
    import grpc
    from rocketmq.grpc_protocol import Code, MessagingServiceStub, QueryRouteRequest
    from rocketmq.v5.util import Signature

    configuration = client_configuration(settings)
    client_id = f"ays-probe-{uuid.uuid4().hex[:12]}"
    probes = []
    for endpoint in settings.endpoints:
        probe = TopicProbe(endpoint)
        probes.append(probe)
        channel = grpc.insecure_channel(endpoint)
        try:
            stub = MessagingServiceStub(channel)
            for topic in topics:
                request = QueryRouteRequest()
                request.topic.name = topic
                request.topic.resource_namespace = settings.namespace
                request.endpoints.CopyFrom(configuration.rpc_endpoints.endpoints)
                try:
                    response = stub.QueryRoute(
                        request,
                        timeout=timeout,
                        metadata=Signature.metadata(configuration, client_id),
                    )
                except grpc.RpcError as err:
                    probe.error = _rpc_reason(err, endpoint, timeout)
                    break
                code = response.status.code
                if code == Code.OK and response.message_queues:
                    probe.found.append(topic)
                elif code in (Code.TOPIC_NOT_FOUND, Code.NOT_FOUND) or code == Code.OK:
                    probe.missing.append(topic)
                else:
                    probe.failed[topic] = f"{Code.Name(code)}: {response.status.message}"
        finally:
            channel.close()
    return probes


def _rpc_reason(err: Any, endpoint: str, timeout: float) -> str:
    import grpc

    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else "") or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer from {endpoint} within {timeout:g}s"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot connect to {endpoint}: {details.splitlines()[0] if details else code}"
    name = code.name if code is not None else "error"
    return f"{endpoint} answered {name}: {details}"


# --- sending ---------------------------------------------------------------------------------


class Publisher:
    """A Producer, used from an asyncio loop. `send` raises TransientTransportError or
    TransportError (see the module docstring), never a client error.

    After REBUILD_AFTER failed sends in a row (an outage) the producer is replaced by a new
    one at most every REBUILD_EVERY seconds: its fresh channel connects at once when the
    proxy is back, where the old one would wait out gRPC's reconnect backoff (up to 2 min).
    """

    REBUILD_AFTER = 3
    REBUILD_EVERY = 5.0

    def __init__(self, settings: RocketMQTransportSettings, who: str, threads: int = 8) -> None:
        self.settings = settings
        self.who = who
        self._pool = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="ays-mq-send"
        )
        self._producer: Any = None
        self._failures = 0
        self._rebuilt = 0.0
        self._rebuilding: asyncio.Lock | None = None

    async def start(self) -> None:
        self._rebuilding = asyncio.Lock()
        self._producer = await asyncio.get_running_loop().run_in_executor(self._pool, self._build)

    def _build(self) -> Any:
        from rocketmq import Producer

        producer = Producer(client_configuration(self.settings))
        producer.startup()  # no topics yet: needs no proxy
        return producer

    async def _rebuild(self) -> None:
        assert self._rebuilding is not None, "start() first"
        async with self._rebuilding:
            if time.monotonic() - self._rebuilt < self.REBUILD_EVERY:
                return
            self._rebuilt = time.monotonic()
            loop = asyncio.get_running_loop()
            old, self._producer = (
                self._producer,
                await loop.run_in_executor(self._pool, self._build),
            )
            self._failures = 0
            log.debug("%s: new RocketMQ producer after failed sends", self.who)
            if old is not None:
                await loop.run_in_executor(self._pool, _quietly, old.shutdown)

    async def send(
        self,
        topic: str,
        body: bytes,
        *,
        key: str = "",
        tag: str = "",
        properties: dict[str, str] | None = None,
    ) -> str:
        """Publish one message; its message id."""
        from rocketmq import Message

        message = Message()
        message.topic = topic
        message.body = body
        if tag:
            message.tag = tag
        if key:
            message.keys = key
        for name, value in (properties or {}).items():
            message.add_property(name, value)
        loop = asyncio.get_running_loop()
        try:
            receipt = await loop.run_in_executor(self._pool, self._producer.send, message)
        except Exception as err:
            error = await self._classify(err, topic)
            if isinstance(error, TransientTransportError):
                self._failures += 1
                if self._failures >= self.REBUILD_AFTER:
                    await self._rebuild()
            raise error from None
        self._failures = 0
        return str(receipt.message_id)

    async def _classify(self, err: Exception, topic: str) -> TransportError:
        doing = f"publishing to topic {topic}"
        error = translate(err, doing)
        if isinstance(error, TransientTransportError) and "route" in str(err):
            # The client says only "failed to fetch topic route": ask the proxy why.
            loop = asyncio.get_running_loop()
            probes = await loop.run_in_executor(self._pool, probe_topics, self.settings, [topic])
            if any(topic in p.missing for p in probes):
                return TransportError(
                    f"{doing}: the topic does not exist on the RocketMQ proxy "
                    f"{', '.join(self.settings.endpoints)}; create it: "
                    f"{mqadmin_command(self.settings, topic)}"
                )
            reasons = "; ".join(p.error for p in probes if p.error)
            if reasons:
                return TransientTransportError(f"{doing}: {reasons}")
        return error

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await asyncio.get_running_loop().run_in_executor(
                self._pool, _quietly, producer.shutdown
            )
        self._pool.shutdown(wait=True, cancel_futures=True)


# --- receiving -------------------------------------------------------------------------------


class Receiver:
    """A SimpleConsumer of one topic for one consumer group, optionally filtered on one tag.

    Its methods block (call them from worker threads). The consumer is built on first use
    and rebuilt, as a new client, after REBUILD_AFTER failed receives in a row: after a proxy
    outage the proxy has forgotten the client's settings and this client only resends them
    every five minutes.
    """

    def __init__(
        self,
        settings: RocketMQTransportSettings,
        group: str,
        topic: str,
        *,
        tag: str | None = None,
        await_duration: int = 10,
        who: str = "",
    ) -> None:
        self.settings = settings
        self.group = group
        self.topic = topic
        self.tag = tag
        self.await_duration = await_duration
        self.who = who
        self._lock = threading.Lock()
        self._consumer: Any = None
        self._failures = 0
        self._closed = False

    def _current(self) -> Any:
        with self._lock:
            if self._closed:
                raise TransientTransportError(f"receiving from {self.topic}: closed")
            if self._consumer is None:
                from rocketmq import FilterExpression, SimpleConsumer

                expression = FilterExpression(self.tag) if self.tag else FilterExpression()
                consumer = SimpleConsumer(
                    client_configuration(self.settings),
                    self.group,
                    {self.topic: expression},
                    await_duration=self.await_duration,
                )
                consumer.startup()  # a proxy that is away makes the receives fail, not this
                self._consumer = consumer
            return self._consumer

    def receive(self, count: int, invisible: int) -> list[Message]:
        consumer = self._current()
        try:
            messages = consumer.receive(count, invisible)
        except Exception as err:
            self._failures += 1
            if self._failures >= REBUILD_AFTER:
                self._discard(consumer)
            raise translate(err, f"receiving from topic {self.topic}") from None
        self._failures = 0
        return list(messages or [])

    def ack(self, message: Message) -> None:
        self._with_consumer(lambda c: c.ack(message), f"acking message {message.message_id}")

    def change_invisible(self, message: Message, seconds: int) -> None:
        """Keep `message` invisible for `seconds` from now (its receipt handle changes)."""
        self._with_consumer(
            lambda c: c.change_invisible_duration(message, seconds),
            f"extending message {message.message_id}",
        )

    def _with_consumer(self, action: Any, doing: str) -> None:
        for attempt in (1, 2):
            consumer = self._current()
            try:
                action(consumer)
                return
            except Exception as err:
                from rocketmq.v5.exception import IllegalStateException

                if isinstance(err, IllegalStateException) and attempt == 1:
                    continue  # rebuilt under us: once more with the new one
                raise translate(err, doing) from None

    def _discard(self, consumer: Any) -> None:
        with self._lock:
            if self._consumer is not consumer:
                return
            self._consumer = None
            self._failures = 0
        log.debug("%s: rebuilding the consumer of %s (%s)", self.who, self.topic, self.group)
        _quietly(consumer.shutdown)

    def close(self) -> None:
        with self._lock:
            consumer, self._consumer = self._consumer, None
            self._closed = True
        if consumer is not None:
            _quietly(consumer.shutdown)


def _quietly(fn: Any) -> None:
    """Run a client shutdown; it logs its own trouble in the client's log."""
    started = time.monotonic()
    try:
        fn()
    except Exception as err:  # the client raises bare Exception on a failed shutdown
        log.debug(
            "rocketmq client shutdown failed after %.1fs: %r", time.monotonic() - started, err
        )
