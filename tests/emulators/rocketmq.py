"""A RocketMQ 5 gRPC proxy emulator for tests: one proxy in front of one broker, in-process.

It serves ``apache.rocketmq.v2.MessagingService`` with the stubs that rocketmq-python-client
ships (``rocketmq.grpc_protocol``), so tests drive it through the real client. Written from
the proxy's gRPC activities in apache/rocketmq (proxy/.../grpc/v2: ``route/RouteActivity``,
``client/ClientActivity``, ``producer/SendMessageActivity``, ``consumer/ReceiveMessageActivity``
+ ``ReceiveMessageResponseStreamWriter``, ``consumer/AckMessageActivity``,
``consumer/ChangeInvisibleDurationActivity``, ``common/GrpcClientSettingsManager``,
``common/GrpcConverter``) and ``ProxyConfig``'s defaults, not from what any client sends.

Public API::

    emu = RocketMQEmulator(topics=["t1", "t2"], port=0)   # timing knobs: see __init__
    emu.start(); emu.port; emu.endpoint                     # "127.0.0.1:PORT"
    emu.create_topic("t3"); emu.delete_topic("t3")
    emu.stop()          # the proxy goes away: RPCs fail UNAVAILABLE, streams end
    emu.start()         # back on the same port; the broker kept every message and offset
    emu.close()         # stop for good (joins the server thread)
    with RocketMQEmulator(topics=[...]) as emu: ...
    emu.messages("t1"); emu.in_flight("t1", "group"); emu.dead_letters("t1", "group")

Behaviour (faithful to the proxy and broker unless listed under "Deviations"):

* Topics must exist: QueryRoute, SendMessage, ReceiveMessage, Ack and ChangeInvisibleDuration
  on a missing topic answer status ``TOPIC_NOT_FOUND``. Every topic has one read-write queue
  (id 0) on broker ``broker-0`` whose endpoints are the address the client asked on, as the
  proxy answers; its accepted message type is the topic's (``NORMAL`` unless created
  otherwise) and a message of another type is refused (``MESSAGE_PROPERTY_CONFLICT_WITH_TYPE``,
  the proxy's ``enableTopicMessageTypeCheck``).
* Consumer groups are created on first use (the broker's ``autoCreateSubscriptionGroup``).
  Clustering: within a group each message is handed to one receiver at a time; every group
  gets every message. A group's first receive on a topic starts at the queue's first message
  (the broker's ``initPopOffsetByCheckMsgInMem`` while offset 0 is still in memory, which is
  always the case here: nothing is ever deleted).
* ReceiveMessage is a long poll: it answers at once when a message is visible, else waits up
  to the polling time (``long_polling_timeout``, or the deadline left minus half the request
  timeout, clamped to [5 s, 20 s]; ``ILLEGAL_POLLING_TIME`` when the deadline leaves less than
  the minimum). The stream is ``status OK``, the messages, then ``delivery_timestamp``; or
  ``MESSAGE_NOT_FOUND`` "no new message" then ``delivery_timestamp``. At most 32 messages.
  The invisible duration must lie in [10 s, 12 h] (``ILLEGAL_INVISIBLE_TIME``); a received
  message stays invisible to the group for it, then becomes visible again with
  ``delivery_attempt`` one higher. Messages whose write to the stream fails are made
  visible again after 1 s (the writer's nack). Tag filters (``*``, ``a||b``) skip
  non-matching messages for that group; SQL92 is refused (``enablePropertyFilter`` off).
  After ``max_attempts`` deliveries (settings' backoff policy: the group's retryMaxTimes 16
  + 1) an expired message goes to the group's dead-letter list instead.
* Receipt handles: a new one per delivery and per ChangeInvisibleDuration. Ack and
  ChangeInvisibleDuration with a handle whose invisible time has passed, or that a later
  delivery or change replaced, answer ``INVALID_RECEIPT_HANDLE``. ChangeInvisibleDuration
  accepts (0, 12 h] and answers the new handle.
* Telemetry: a ``settings`` command is stored for the client id (``x-mq-client-id`` header)
  and echoed back merged as the proxy does: producers get the backoff policy (3 attempts,
  exponential 10 ms..1 s x2), ``max_body_size`` 4 MiB and ``validate_message_type``;
  consumers get ``receive_batch_size`` 32, ``long_polling_timeout`` 20 s, ``fifo`` false and
  max attempts 17; ``metric.on`` false. Settings without publishing or subscription end the
  stream ``INVALID_ARGUMENT``. When the stream ends (client closed it, or the connection
  dropped) the settings are removed, as ``cleanupClientOnTelemetryClose`` does.
* Heartbeat and NotifyClientTermination need stored settings (else
  ``UNRECOGNIZED_CLIENT_TYPE`` "cannot find client settings for this client"); ReceiveMessage
  without settings fails ``INTERNAL_SERVER_ERROR`` (the proxy's null settings).
* Fault injection for tests: ``refuse_acks(topic, n)`` fails the next n acks on `topic`;
  ``drop_send_answers(topic, every)`` stores every `every`-th send on `topic` and then
  drops its answer (the call fails UNAVAILABLE, as when the connection breaks after the
  broker wrote the message): the client sends again, and the broker keeps both copies, as
  a real one does (no deduplication by message id), so both are delivered.
* An outage: ``stop()`` drops the proxy (connections, streams, long polls, stored client
  settings: proxy memory); messages, offsets, in-flight messages and their timers are the
  broker's and survive, so invisibility keeps running during the outage.

Deviations (deliberate, for scope):

* No authentication/ACL: credentials are accepted, never checked. No namespaces beyond
  prefixing the resource name with ``namespace%``.
* One queue per topic; no FIFO ordering guarantees, transactions, delay/timer messages,
  recall, lite topics, PullMessage/offset RPCs or ForwardMessageToDeadLetterQueue (all
  answer ``UNSUPPORTED`` or gRPC UNIMPLEMENTED).
* Expired messages become visible exactly at their invisible time (the broker's revive
  service adds up to about a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from ays_runtime.transport.rocketmq_client import load_client

# Importing the client package configures its log file; keep it out of the home directory.
load_client(Path(tempfile.gettempdir()) / "ays-tests-rocketmq-client")

from rocketmq.grpc_protocol import definition_pb2 as pb  # noqa: E402
from rocketmq.grpc_protocol import service_pb2 as rpc  # noqa: E402
from rocketmq.grpc_protocol import service_pb2_grpc  # noqa: E402

__all__ = ["RocketMQEmulator"]

Code = pb.Code
NAME_PATTERN = re.compile(r"^[%a-zA-Z0-9_-]+$")  # the proxy's topic and group validators
NAME_MAX = 127  # topics; groups may be 255
MAX_BODY = 4 * 1024 * 1024  # ProxyConfig.maxMessageSize
MIN_INVISIBLE = 10.0  # ProxyConfig.minInvisibleTimeMillsForRecv
MAX_INVISIBLE = 12 * 3600.0  # ProxyConfig.maxInvisibleTimeMills
MIN_POLL = 5.0  # grpcClientConsumerMinLongPollingTimeoutMillis
MAX_POLL = 20.0  # grpcClientConsumerMaxLongPollingTimeoutMillis
MAX_BATCH = 32  # grpcClientConsumerLongPollingBatchSize
RETRY_MAX_TIMES = 16  # SubscriptionGroupConfig.retryMaxTimes
NACK_DELAY = 1.0  # ReceiveMessageResponseStreamWriter.NACK_INVISIBLE_TIME
BROKER = "broker-0"


def _status(code: int, message: str = "") -> pb.Status:
    return pb.Status(code=code, message=message or Code.Name(code))


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(int(seconds * 1000))
    return d


def _timestamp(epoch: float) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromMilliseconds(int(epoch * 1000))
    return t


class _Refused(Exception):
    """A request the proxy answers with a non-OK status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Message:
    offset: int
    topic: str
    body: bytes
    tag: str
    keys: list[str]
    properties: dict[str, str]
    message_id: str
    message_type: int
    born_timestamp: timestamp_pb2.Timestamp
    born_host: str
    store_time: float


@dataclass
class _InFlight:
    handle: str
    visible_at: float  # time.monotonic()
    attempt: int  # deliveries so far, this one included


@dataclass
class _Subscription:
    """One consumer group's view of one topic's queue (the broker's pop state)."""

    next_offset: int = 0
    in_flight: dict[int, _InFlight] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)  # offset -> deliveries so far
    dead: list[int] = field(default_factory=list)
    delivered: int = 0  # deliveries, redeliveries included (for tests)


@dataclass
class _Topic:
    name: str
    message_type: int
    messages: list[_Message] = field(default_factory=list)
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)


@dataclass(frozen=True)
class _Handle:
    topic: str
    group: str
    offset: int


class RocketMQEmulator:
    """See the module docstring. Thread-safe: state lives on the server thread's loop."""

    def __init__(
        self,
        topics: Iterable[str] = (),
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        min_invisible: float = MIN_INVISIBLE,
        min_poll: float = MIN_POLL,
        max_poll: float = MAX_POLL,
    ) -> None:
        self.host = host
        self._port = port
        self.min_invisible = min_invisible
        self.min_poll = min_poll
        self.max_poll = max_poll
        self._topics: dict[str, _Topic] = {}
        for name in topics:
            self._add_topic(name, pb.MessageType.NORMAL)
        self._handles: dict[str, _Handle] = {}
        self._settings: dict[str, pb.Settings] = {}  # proxy memory: client id -> settings
        self._consumers: dict[str, dict[str, float]] = {}  # group -> client id -> last beat
        self._changed: asyncio.Condition | None = None
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._calls: dict[str, int] = {}
        self._refused_acks: dict[str, int] = {}
        self._dropped_answers: dict[str, int] = {}  # topic -> drop every n-th send's answer
        self._sends: dict[str, int] = {}
        self.answers_dropped = 0

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> RocketMQEmulator:
        if self._loop is None:
            ready = threading.Event()
            self._thread = threading.Thread(
                target=self._run_loop, args=(ready,), name="rocketmq-emulator", daemon=True
            )
            self._thread.start()
            ready.wait()
        if self._server is None:
            self._call(self._serve())
        return self

    def stop(self) -> None:
        """The proxy goes away (an outage): see the module docstring."""
        if self._server is not None:
            self._call(self._halt())

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            # Still cancelling grpc's server tasks (seen under load): the thread is a daemon
            # and ends with the process; closing a loop that still runs would only raise.
            if not thread.is_alive():
                loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> RocketMQEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run_loop(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._changed = asyncio.Condition()
        ready.set()
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())

    def _call(self, coro: Any, timeout: float = 10) -> Any:
        assert self._loop is not None, "start() first"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _serve(self) -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        service_pb2_grpc.add_MessagingServiceServicer_to_server(_Servicer(self), server)
        port = server.add_insecure_port(f"{self.host}:{self._port}")
        if port == 0:
            raise OSError(f"rocketmq emulator: cannot listen on {self.host}:{self._port}")
        self._port = port
        await server.start()
        self._server = server

    async def _halt(self) -> None:
        server, self._server = self._server, None
        self._settings.clear()
        self._consumers.clear()
        if server is not None:
            await server.stop(grace=None)

    # --- test helpers ---------------------------------------------------------------------

    def create_topic(self, name: str, message_type: str = "NORMAL") -> None:
        kind = pb.MessageType.Value(message_type)
        if self._loop is None:
            self._add_topic(name, kind)
        else:
            self._call(self._async(lambda: self._add_topic(name, kind)))

    def delete_topic(self, name: str) -> None:
        self._call(self._async(lambda: self._topics.pop(name, None)))

    def topics(self) -> list[str]:
        return sorted(self._call(self._async(lambda: list(self._topics))))

    def messages(self, topic: str) -> list[dict[str, Any]]:
        """Every message stored on `topic`: body, tag, keys, properties, message_id."""

        def read() -> list[dict[str, Any]]:
            return [
                {
                    "body": m.body,
                    "tag": m.tag,
                    "keys": list(m.keys),
                    "properties": dict(m.properties),
                    "message_id": m.message_id,
                }
                for m in self._topics[topic].messages
            ]

        return self._call(self._async(read))

    def in_flight(self, topic: str, group: str) -> int:
        """Messages of `topic` received by `group` and neither acked nor visible again."""

        def count() -> int:
            sub = self._topics[topic].subscriptions.get(group)
            return 0 if sub is None else len(sub.in_flight)

        return self._call(self._async(count))

    def deliveries(self, topic: str, group: str) -> int:
        def count() -> int:
            sub = self._topics[topic].subscriptions.get(group)
            return 0 if sub is None else sub.delivered

        return self._call(self._async(count))

    def dead_letters(self, topic: str, group: str) -> list[bytes]:
        def read() -> list[bytes]:
            t = self._topics[topic]
            sub = t.subscriptions.get(group)
            return [] if sub is None else [t.messages[o].body for o in sub.dead]

        return self._call(self._async(read))

    def refuse_acks(self, topic: str, count: int) -> None:
        """Fault injection: answer the next `count` ack entries for `topic`
        INTERNAL_SERVER_ERROR (as a broker that fails to write the ack would); the messages
        stay in flight."""
        self._refused_acks[topic] = count

    def drop_send_answers(self, topic: str, every: int) -> None:
        """Fault injection: from now on, store every `every`-th send on `topic` and drop its
        answer (0 stops it); `answers_dropped` counts them."""
        self._dropped_answers[topic] = every
        self._sends[topic] = 0

    def calls(self, method: str) -> int:
        """How many times `method` (e.g. "SendMessage") was called."""
        return self._calls.get(method, 0)

    @staticmethod
    async def _async(fn: Any) -> Any:
        return fn()

    # --- the broker -----------------------------------------------------------------------

    def _add_topic(self, name: str, message_type: int) -> None:
        if name not in self._topics:
            self._topics[name] = _Topic(name, message_type)

    def _topic(self, resource: pb.Resource) -> _Topic:
        name = _wrapped(resource)
        if not resource.name:
            raise _Refused(Code.ILLEGAL_TOPIC, "topic name cannot be empty")
        if len(resource.name) > NAME_MAX or not NAME_PATTERN.match(resource.name):
            raise _Refused(
                Code.ILLEGAL_TOPIC, f"topic name {resource.name!r} does not match {NAME_PATTERN}"
            )
        topic = self._topics.get(name)
        if topic is None:
            raise _Refused(
                Code.TOPIC_NOT_FOUND,
                f"CODE: 17 DESC: No topic route info in name server for the topic: {name}",
            )
        return topic

    @staticmethod
    def _group(resource: pb.Resource) -> str:
        if not resource.name:
            raise _Refused(Code.ILLEGAL_CONSUMER_GROUP, "consumer group cannot be empty")
        if len(resource.name) > 255 or not NAME_PATTERN.match(resource.name):
            raise _Refused(
                Code.ILLEGAL_CONSUMER_GROUP,
                f"consumer group {resource.name!r} does not match {NAME_PATTERN}",
            )
        return _wrapped(resource)

    def _subscription(self, topic: _Topic, group: str) -> _Subscription:
        sub = topic.subscriptions.get(group)
        if sub is None:
            sub = topic.subscriptions[group] = _Subscription()
        return sub

    def _new_handle(self, topic: _Topic, group: str, offset: int) -> str:
        handle = f"{offset}_{uuid.uuid4().hex}"
        self._handles[handle] = _Handle(topic.name, group, offset)
        return handle

    def _held(self, topic: _Topic, group: str, handle: str) -> tuple[_Subscription, int]:
        """The in-flight entry `handle` names, or INVALID_RECEIPT_HANDLE."""
        ref = self._handles.get(handle)
        if ref is None or ref.topic != topic.name or ref.group != group:
            raise _Refused(Code.INVALID_RECEIPT_HANDLE, "receipt handle is invalid")
        sub = topic.subscriptions.get(group)
        held = None if sub is None else sub.in_flight.get(ref.offset)
        if sub is None or held is None or held.handle != handle:
            raise _Refused(Code.INVALID_RECEIPT_HANDLE, "receipt handle is expired")
        if held.visible_at <= time.monotonic():
            raise _Refused(Code.INVALID_RECEIPT_HANDLE, "receipt handle is expired")
        return sub, ref.offset

    def _max_attempts(self, client_id: str) -> int:
        settings = self._settings.get(client_id)
        if settings is not None and settings.backoff_policy.max_attempts > 0:
            return settings.backoff_policy.max_attempts
        return RETRY_MAX_TIMES + 1

    def _take(
        self,
        topic: _Topic,
        group: str,
        tags: set[str] | None,
        batch: int,
        invisible: float,
        max_attempts: int,
    ) -> list[tuple[_Message, _InFlight]]:
        """Pop up to `batch` visible messages for `group` (expired ones first)."""
        sub = self._subscription(topic, group)
        now = time.monotonic()
        taken: list[tuple[_Message, _InFlight]] = []
        for offset in sorted(o for o, f in sub.in_flight.items() if f.visible_at <= now):
            if len(taken) >= batch:
                break
            del sub.in_flight[offset]
            if sub.attempts.get(offset, 0) >= max_attempts:
                sub.dead.append(offset)
                continue
            taken.append(self._deliver(topic, group, sub, offset, invisible, now))
        while len(taken) < batch and sub.next_offset < len(topic.messages):
            offset = sub.next_offset
            sub.next_offset += 1
            if tags is not None and topic.messages[offset].tag not in tags:
                continue  # filtered out: consumed for this group
            taken.append(self._deliver(topic, group, sub, offset, invisible, now))
        return taken

    def _deliver(
        self,
        topic: _Topic,
        group: str,
        sub: _Subscription,
        offset: int,
        invisible: float,
        now: float,
    ) -> tuple[_Message, _InFlight]:
        attempt = sub.attempts.get(offset, 0) + 1
        sub.attempts[offset] = attempt
        sub.delivered += 1
        held = _InFlight(self._new_handle(topic, group, offset), now + invisible, attempt)
        sub.in_flight[offset] = held
        return topic.messages[offset], held

    def _next_visible(self, topic: _Topic, group: str) -> float | None:
        sub = topic.subscriptions.get(group)
        if sub is None or not sub.in_flight:
            return None
        return min(f.visible_at for f in sub.in_flight.values())

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()


def _wrapped(resource: pb.Resource) -> str:
    """NamespaceUtil.wrapNamespace: `namespace%name` when a namespace is given."""
    if resource.resource_namespace:
        return f"{resource.resource_namespace}%{resource.name}"
    return resource.name


def _tags(expression: pb.FilterExpression) -> set[str] | None:
    """The tags a TAG filter admits; None for all. SQL92 is refused."""
    if expression.type == pb.FilterType.SQL:
        raise _Refused(
            Code.ILLEGAL_FILTER_EXPRESSION,
            "The broker does not support consumer to filter message by SQL92",
        )
    text = expression.expression.strip()
    if not text or text == "*":
        return None
    return {part.strip() for part in text.split("||") if part.strip()}


def _client_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-mq-client-id":
            return str(value)
    return ""


class _Servicer(service_pb2_grpc.MessagingServiceServicer):
    """The proxy's activities, each one translating _Refused into a status."""

    def __init__(self, emu: RocketMQEmulator) -> None:
        self.emu = emu

    def _count(self, name: str) -> None:
        self.emu._calls[name] = self.emu._calls.get(name, 0) + 1

    # --- route ------------------------------------------------------------------------------

    async def QueryRoute(self, request: rpc.QueryRouteRequest, context: Any) -> Any:  # noqa: N802
        self._count("QueryRoute")
        try:
            topic = self.emu._topic(request.topic)
        except _Refused as refused:
            return rpc.QueryRouteResponse(status=_status(refused.code, str(refused)))
        queue = pb.MessageQueue(
            topic=request.topic,
            id=0,
            permission=pb.Permission.READ_WRITE,
            broker=self._broker(request.endpoints),
            accept_message_types=[topic.message_type],
        )
        return rpc.QueryRouteResponse(status=_status(Code.OK), message_queues=[queue])

    async def QueryAssignment(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._count("QueryAssignment")
        try:
            self.emu._topic(request.topic)
            self.emu._group(request.group)
        except _Refused as refused:
            return rpc.QueryAssignmentResponse(status=_status(refused.code, str(refused)))
        queue = pb.MessageQueue(
            topic=request.topic,
            id=-1,
            permission=pb.Permission.READ_WRITE,
            broker=self._broker(request.endpoints),
        )
        return rpc.QueryAssignmentResponse(
            status=_status(Code.OK), assignments=[pb.Assignment(message_queue=queue)]
        )

    def _broker(self, endpoints: pb.Endpoints) -> pb.Broker:
        # The proxy answers with the host the client used and its own gRPC port.
        scheme = endpoints.scheme or pb.AddressScheme.IPv4
        hosts = [a.host for a in endpoints.addresses] or [self.emu.host]
        addresses = [pb.Address(host=h, port=self.emu.port) for h in hosts]
        return pb.Broker(
            name=BROKER, id=0, endpoints=pb.Endpoints(scheme=scheme, addresses=addresses)
        )

    # --- clients ----------------------------------------------------------------------------

    async def Telemetry(  # noqa: N802
        self, request_iterator: AsyncIterator[rpc.TelemetryCommand], context: Any
    ) -> AsyncIterator[rpc.TelemetryCommand]:
        self._count("Telemetry")
        client_id = _client_id(context)
        try:
            async for command in request_iterator:
                if not command.HasField("settings"):
                    continue  # thread stacks / verify results: nothing to answer
                settings = command.settings
                case = settings.WhichOneof("pub_sub")
                if case is None:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "there is no publishing or subscription data in settings",
                    )
                if case == "publishing" and settings.client_type != pb.ClientType.PRODUCER:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "publishing settings require PRODUCER client type",
                    )
                if case == "subscription":
                    try:
                        self.emu._group(settings.subscription.group)
                    except _Refused as refused:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(refused))
                merged = _merged(settings)
                if client_id:
                    self.emu._settings[client_id] = merged
                yield rpc.TelemetryCommand(status=_status(Code.OK), settings=merged)
        finally:
            if client_id:
                self.emu._settings.pop(client_id, None)

    async def Heartbeat(self, request: rpc.HeartbeatRequest, context: Any) -> Any:  # noqa: N802
        self._count("Heartbeat")
        client_id = _client_id(context)
        settings = self.emu._settings.get(client_id)
        if not client_id:
            return rpc.HeartbeatResponse(status=_status(Code.CLIENT_ID_REQUIRED))
        if settings is None:
            return rpc.HeartbeatResponse(
                status=_status(
                    Code.UNRECOGNIZED_CLIENT_TYPE, "cannot find client settings for this client"
                )
            )
        if settings.client_type != pb.ClientType.PRODUCER:
            try:
                group = self.emu._group(request.group)
            except _Refused as refused:
                return rpc.HeartbeatResponse(status=_status(refused.code, str(refused)))
            self.emu._consumers.setdefault(group, {})[client_id] = time.monotonic()
        return rpc.HeartbeatResponse(status=_status(Code.OK))

    async def NotifyClientTermination(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._count("NotifyClientTermination")
        client_id = _client_id(context)
        settings = self.emu._settings.pop(client_id, None)
        if settings is None:
            return rpc.NotifyClientTerminationResponse(
                status=_status(
                    Code.UNRECOGNIZED_CLIENT_TYPE, "cannot find client settings for this client"
                )
            )
        if settings.client_type != pb.ClientType.PRODUCER and request.group.name:
            self.emu._consumers.get(_wrapped(request.group), {}).pop(client_id, None)
        return rpc.NotifyClientTerminationResponse(status=_status(Code.OK))

    # --- producing --------------------------------------------------------------------------

    async def SendMessage(self, request: rpc.SendMessageRequest, context: Any) -> Any:  # noqa: N802
        self._count("SendMessage")
        emu = self.emu
        try:
            if not request.messages:
                raise _Refused(Code.MESSAGE_CORRUPTED, "no message to send")
            topic = emu._topic(request.messages[0].topic)
            stored = [self._validated(topic, m) for m in request.messages]
        except _Refused as refused:
            return rpc.SendMessageResponse(status=_status(refused.code, str(refused)))
        entries = []
        for message in stored:
            message.offset = len(topic.messages)
            topic.messages.append(message)
            entries.append(
                rpc.SendResultEntry(
                    status=_status(Code.OK),
                    message_id=message.message_id,
                    offset=message.offset,
                )
            )
        await emu._notify()
        every = emu._dropped_answers.get(topic.name, 0)
        if every:
            emu._sends[topic.name] = emu._sends.get(topic.name, 0) + 1
            if emu._sends[topic.name] % every == 0:
                emu.answers_dropped += 1
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, "connection reset after the message was stored"
                )
        return rpc.SendMessageResponse(status=_status(Code.OK), entries=entries)

    def _validated(self, topic: _Topic, message: pb.Message) -> _Message:
        props = message.system_properties
        if _wrapped(message.topic) != topic.name:
            raise _Refused(Code.MESSAGE_CORRUPTED, "topic in message is not same")
        if not props.message_id:
            raise _Refused(Code.ILLEGAL_MESSAGE_ID, "message id is empty")
        if not message.body:
            raise _Refused(Code.MESSAGE_BODY_EMPTY, "message body cannot be empty")
        if len(message.body) > MAX_BODY:
            raise _Refused(
                Code.MESSAGE_BODY_TOO_LARGE,
                f"message body cannot exceed the max {MAX_BODY}",
            )
        if props.tag and (not props.tag.strip() or "|" in props.tag):
            raise _Refused(Code.ILLEGAL_MESSAGE_TAG, f"tag {props.tag!r} is not valid")
        for key in props.keys:
            if not key.strip():
                raise _Refused(Code.ILLEGAL_MESSAGE_KEY, "key cannot be blank")
        if props.message_type != topic.message_type:
            raise _Refused(
                Code.MESSAGE_PROPERTY_CONFLICT_WITH_TYPE,
                f"current message type {pb.MessageType.Name(props.message_type)} does not "
                f"match topic {topic.name}'s type {pb.MessageType.Name(topic.message_type)}",
            )
        return _Message(
            offset=-1,
            topic=topic.name,
            body=bytes(message.body),
            tag=props.tag,
            keys=list(props.keys),
            properties=dict(message.user_properties),
            message_id=props.message_id,
            message_type=props.message_type,
            born_timestamp=props.born_timestamp,
            born_host=props.born_host,
            store_time=time.time(),
        )

    # --- consuming --------------------------------------------------------------------------

    async def ReceiveMessage(  # noqa: N802
        self, request: rpc.ReceiveMessageRequest, context: Any
    ) -> AsyncIterator[rpc.ReceiveMessageResponse]:
        self._count("ReceiveMessage")
        emu = self.emu
        client_id = _client_id(context)
        try:
            if not client_id:
                raise _Refused(Code.CLIENT_ID_REQUIRED, "client id cannot be empty")
            settings = emu._settings.get(client_id)
            if settings is None:
                raise _Refused(Code.INTERNAL_SERVER_ERROR, "null")  # the proxy's NPE
            poll = self._polling_time(request, settings, context)
            topic = emu._topic(request.message_queue.topic)
            group = emu._group(request.group)
            invisible = request.invisible_duration.ToMilliseconds() / 1000
            if not emu.min_invisible <= invisible <= MAX_INVISIBLE:
                raise _Refused(
                    Code.ILLEGAL_INVISIBLE_TIME,
                    f"the invisibleTime is too small or too large. invisibleTime must be in "
                    f"[{emu.min_invisible * 1000:.0f}, {MAX_INVISIBLE * 1000:.0f}]",
                )
            tags = _tags(request.filter_expression)
        except _Refused as refused:
            yield rpc.ReceiveMessageResponse(status=_status(refused.code, str(refused)))
            yield rpc.ReceiveMessageResponse(delivery_timestamp=_timestamp(time.time()))
            return
        batch = max(1, min(request.batch_size or 1, MAX_BATCH))
        max_attempts = emu._max_attempts(client_id)
        deadline = time.monotonic() + poll
        assert emu._changed is not None
        taken: list[tuple[_Message, _InFlight]] = []
        while True:
            taken = emu._take(topic, group, tags, batch, invisible, max_attempts)
            left = deadline - time.monotonic()
            if taken or left <= 0:
                break
            wake = emu._next_visible(topic, group)
            if wake is not None:
                left = min(left, max(0.0, wake - time.monotonic()) + 0.001)
            async with emu._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(emu._changed.wait(), left)
        if not taken:
            yield rpc.ReceiveMessageResponse(
                status=_status(Code.MESSAGE_NOT_FOUND, "no new message")
            )
            yield rpc.ReceiveMessageResponse(delivery_timestamp=_timestamp(time.time()))
            return
        sent = 0
        try:
            yield rpc.ReceiveMessageResponse(status=_status(Code.OK))
            for message, held in taken:
                yield rpc.ReceiveMessageResponse(message=_wire(message, held, invisible))
                sent += 1
            yield rpc.ReceiveMessageResponse(delivery_timestamp=_timestamp(time.time()))
        finally:
            # Messages that never reached the client are nacked: visible again soon.
            for _, held in taken[sent:]:
                held.visible_at = min(held.visible_at, time.monotonic() + NACK_DELAY)

    def _polling_time(self, request: Any, settings: pb.Settings, context: Any) -> float:
        emu = self.emu
        remaining = context.time_remaining()
        remaining = 3600.0 if remaining is None else remaining
        if request.HasField("long_polling_timeout"):
            poll = request.long_polling_timeout.ToMilliseconds() / 1000
        else:
            poll = remaining - settings.request_timeout.ToMilliseconds() / 2000
        poll = min(max(poll, emu.min_poll), emu.max_poll)
        if poll > remaining:
            if remaining < emu.min_poll:
                raise _Refused(
                    Code.ILLEGAL_POLLING_TIME,
                    "The deadline time remaining is not enough for polling, please check "
                    "network condition",
                )
            poll = remaining
        return poll

    async def AckMessage(self, request: rpc.AckMessageRequest, context: Any) -> Any:  # noqa: N802
        self._count("AckMessage")
        emu = self.emu
        try:
            topic = emu._topic(request.topic)
            group = emu._group(request.group)
        except _Refused as refused:
            return rpc.AckMessageResponse(status=_status(refused.code, str(refused)))
        entries = []
        for entry in request.entries:
            try:
                sub, offset = emu._held(topic, group, entry.receipt_handle)
                if emu._refused_acks.get(topic.name, 0) > 0:
                    emu._refused_acks[topic.name] -= 1
                    raise _Refused(Code.INTERNAL_SERVER_ERROR, "ack failed: status is abnormal")
            except _Refused as refused:
                status = _status(refused.code, str(refused))
            else:
                del sub.in_flight[offset]
                status = _status(Code.OK)
            entries.append(
                rpc.AckMessageResultEntry(
                    message_id=entry.message_id,
                    receipt_handle=entry.receipt_handle,
                    status=status,
                )
            )
        codes = {e.status.code for e in entries}
        if len(codes) > 1:
            status = _status(Code.MULTIPLE_RESULTS)
        elif codes:
            status = entries[0].status
        else:
            status = _status(Code.INTERNAL_SERVER_ERROR, "ack message result is empty")
        return rpc.AckMessageResponse(status=status, entries=entries)

    async def ChangeInvisibleDuration(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._count("ChangeInvisibleDuration")
        emu = self.emu
        try:
            topic = emu._topic(request.topic)
            group = emu._group(request.group)
            invisible = request.invisible_duration.ToMilliseconds() / 1000
            if not 0 < invisible <= MAX_INVISIBLE:
                raise _Refused(
                    Code.ILLEGAL_INVISIBLE_TIME,
                    f"the invisibleTime is too small or too large. invisibleTime must be in "
                    f"(0, {MAX_INVISIBLE * 1000:.0f}]",
                )
            sub, offset = emu._held(topic, group, request.receipt_handle)
        except _Refused as refused:
            return rpc.ChangeInvisibleDurationResponse(status=_status(refused.code, str(refused)))
        emu._handles.pop(request.receipt_handle, None)
        held = sub.in_flight[offset]
        held.handle = emu._new_handle(topic, group, offset)
        held.visible_at = time.monotonic() + invisible
        await emu._notify()  # a shorter invisibility can make it visible sooner
        return rpc.ChangeInvisibleDurationResponse(
            status=_status(Code.OK), receipt_handle=held.handle
        )


def _merged(settings: pb.Settings) -> pb.Settings:
    """GrpcClientSettingsManager.getClientSettings with ProxyConfig's defaults."""
    merged = pb.Settings()
    merged.CopyFrom(settings)
    if settings.HasField("publishing"):
        merged.backoff_policy.max_attempts = 3
        merged.backoff_policy.exponential_backoff.initial.CopyFrom(_duration(0.010))
        merged.backoff_policy.exponential_backoff.max.CopyFrom(_duration(1.0))
        merged.backoff_policy.exponential_backoff.multiplier = 2
        merged.publishing.validate_message_type = True
        merged.publishing.max_body_size = MAX_BODY
    elif settings.HasField("subscription"):
        merged.subscription.receive_batch_size = MAX_BATCH
        merged.subscription.long_polling_timeout.CopyFrom(_duration(MAX_POLL))
        merged.subscription.fifo = False
        merged.backoff_policy.max_attempts = RETRY_MAX_TIMES + 1
        backoff = merged.backoff_policy.customized_backoff
        del backoff.next[:]
        for seconds in (1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200):
            backoff.next.append(_duration(seconds))
    merged.metric.on = False
    return merged


def _wire(message: _Message, held: _InFlight, invisible: float) -> pb.Message:
    """GrpcConverter.buildMessage: what a consumer receives."""
    props = pb.SystemProperties(
        tag=message.tag,
        keys=message.keys,
        message_id=message.message_id,
        body_digest=pb.Digest(
            type=pb.DigestType.MD5, checksum=hashlib.md5(message.body).hexdigest().upper()
        ),
        body_encoding=pb.Encoding.IDENTITY,
        message_type=message.message_type,
        born_timestamp=message.born_timestamp,
        born_host=message.born_host,
        store_timestamp=_timestamp(message.store_time),
        store_host="127.0.0.1:10911",
        receipt_handle=held.handle,
        queue_id=0,
        queue_offset=message.offset,
        invisible_duration=_duration(invisible),
        delivery_attempt=held.attempt,
    )
    return pb.Message(
        topic=pb.Resource(name=message.topic.split("%")[-1]),
        user_properties=message.properties,
        system_properties=props,
        body=message.body,
    )
