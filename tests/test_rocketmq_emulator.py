"""The RocketMQ proxy emulator, driven through rocketmq-python-client (and its gRPC stubs
where the client hides a status code)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

# First: importing the emulator keeps the client's log file out of the home directory.
from tests.emulators.rocketmq import RocketMQEmulator

# isort: split
from rocketmq import (
    ClientConfiguration,
    Credentials,
    FilterExpression,
    Message,
    Producer,
    SimpleConsumer,
)
from rocketmq.grpc_protocol import (
    ClientType,
    Code,
    MessagingServiceStub,
    QueryRouteRequest,
    SendMessageRequest,
    TelemetryCommand,
)
from rocketmq.v5.exception import BadRequestException

TOPICS = ["jobs", "other"]


@pytest.fixture(autouse=True)
def main_thread_event_loop() -> Iterator[None]:
    """grpc.aio, under the client, creates a call on the calling thread's event loop. An
    earlier test's asyncio.run() leaves the main thread with none (set_event_loop(None)), and
    the client then fails now and then ("no current event loop in thread 'MainThread'"),
    depending on which of its threads opens the telemetry stream first. An application calling
    the client from a plain main thread has the loop Python makes for it; so do these tests."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()


@pytest.fixture
def emu() -> Iterator[RocketMQEmulator]:
    with RocketMQEmulator(topics=TOPICS) as emulator:
        yield emulator


@pytest.fixture
def clients() -> Iterator[list[Any]]:
    """Started clients, shut down after the test (their threads and channels with them)."""
    started: list[Any] = []
    yield started
    for client in reversed(started):
        if client.is_running:
            client.shutdown()


@pytest.fixture
def producer(emu: RocketMQEmulator, clients: list[Any]) -> Producer:
    client = Producer(_config(emu))
    client.startup()
    clients.append(client)
    return client


@pytest.fixture
def consumer(emu: RocketMQEmulator, clients: list[Any]) -> Callable[..., SimpleConsumer]:
    def make(group: str, topic: str = "jobs", tag: str | None = None) -> SimpleConsumer:
        expression = FilterExpression(tag) if tag else FilterExpression()
        client = SimpleConsumer(_config(emu), group, {topic: expression}, await_duration=5)
        client.startup()
        clients.append(client)
        return client

    return make


def _config(emu: RocketMQEmulator) -> ClientConfiguration:
    return ClientConfiguration(emu.endpoint, Credentials())


def _send(producer: Producer, body: bytes, topic: str = "jobs", **props: str) -> str:
    message = Message()
    message.topic = topic
    message.body = body
    if "tag" in props:
        message.tag = props["tag"]
    if "key" in props:
        message.keys = props["key"]
    return str(producer.send(message).message_id)


def _receive_all(client: SimpleConsumer, want: int, timeout: float = 15) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += client.receive(32, 15)
    return got


def test_a_sent_message_is_received_with_its_tag_keys_and_body_and_an_ack_ends_it(
    emu: RocketMQEmulator, producer: Producer, consumer: Callable[..., SimpleConsumer]
) -> None:
    receiver = consumer("workers")
    message_id = _send(producer, b'{"job": 1}', tag="shell", key="1001")
    [got] = receiver.receive(16, 15)
    assert (got.body, got.tag, got.keys, got.message_id) == (
        b'{"job": 1}',
        "shell",
        {"1001"},
        message_id,
    )
    assert got.delivery_attempt == 1 and not got.corrupted
    assert emu.in_flight("jobs", "workers") == 1
    receiver.ack(got)
    assert emu.in_flight("jobs", "workers") == 0
    started = time.monotonic()
    assert receiver.receive(16, 15) == []  # a long poll that finds nothing
    assert time.monotonic() - started >= 4.5


def test_an_unacked_message_comes_back_after_its_invisible_duration_with_the_next_attempt(
    producer: Producer, consumer: Callable[..., SimpleConsumer]
) -> None:
    first, second = consumer("workers"), consumer("workers")
    _send(producer, b"job")
    [got] = first.receive(1, 10)
    received = time.monotonic()
    [again] = _receive_all(second, 1)
    assert again.body == b"job" and again.delivery_attempt == 2
    assert time.monotonic() - received >= 9.5
    with pytest.raises(BadRequestException, match="40013|expired"):
        first.ack(got)  # its invisible time is over: the handle is no longer valid
    second.ack(again)


def test_changing_the_invisible_duration_postpones_or_hastens_redelivery(
    producer: Producer, consumer: Callable[..., SimpleConsumer]
) -> None:
    receiver = consumer("workers")
    _send(producer, b"job")
    [got] = receiver.receive(1, 10)
    old_handle = got.receipt_handle
    receiver.change_invisible_duration(got, 30)
    assert got.receipt_handle != old_handle
    time.sleep(10.5)
    assert receiver.receive(1, 10) == []  # still invisible past the first 10 s
    receiver.change_invisible_duration(got, 1)  # hand it back soon
    [again] = receiver.receive(1, 10)
    assert again.delivery_attempt == 2
    receiver.ack(again)


def test_a_replaced_receipt_handle_is_refused(
    producer: Producer, consumer: Callable[..., SimpleConsumer]
) -> None:
    receiver = consumer("workers")
    _send(producer, b"job")
    [got] = receiver.receive(1, 10)
    stale = Message()
    stale.topic, stale.receipt_handle = got.topic, got.receipt_handle
    stale.message_id, stale.endpoints = got.message_id, got.endpoints
    receiver.change_invisible_duration(got, 20)
    with pytest.raises(BadRequestException, match="40013"):
        receiver.ack(stale)
    receiver.ack(got)


def test_two_consumer_groups_each_get_every_message(
    producer: Producer, consumer: Callable[..., SimpleConsumer]
) -> None:
    a, b = consumer("group-a"), consumer("group-b")
    _send(producer, b"one")
    _send(producer, b"two")
    for receiver in (a, b):
        got = _receive_all(receiver, 2)
        assert sorted(m.body for m in got) == [b"one", b"two"]
        for message in got:
            receiver.ack(message)


def test_two_consumers_of_one_group_share_the_messages_each_taken_once(
    producer: Producer, consumer: Callable[..., SimpleConsumer]
) -> None:
    receivers = [consumer("workers"), consumer("workers")]
    for i in range(40):
        _send(producer, f"job-{i}".encode())
    taken: list[list[bytes]] = [[], []]

    def drain(index: int) -> None:
        idle = 0
        while idle < 1:
            got = receivers[index].receive(3, 30)
            idle = 0 if got else idle + 1
            for message in got:
                taken[index].append(message.body)
                receivers[index].ack(message)

    threads = [threading.Thread(target=drain, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    everything = taken[0] + taken[1]
    assert sorted(everything) == sorted(f"job-{i}".encode() for i in range(40))
    assert taken[0] and taken[1], "both consumers of the group got a share"


def test_a_tag_filter_hands_a_group_only_its_tags(
    producer: Producer, consumer: Callable[..., SimpleConsumer]
) -> None:
    mine = consumer("node-a", tag="n_a")
    _send(producer, b"for b", tag="n_b")
    _send(producer, b"for a", tag="n_a")
    [got] = _receive_all(mine, 1)
    assert got.body == b"for a"
    mine.ack(got)
    assert mine.receive(5, 10) == []


def test_a_missing_topic_is_topic_not_found_for_route_and_send(
    emu: RocketMQEmulator, producer: Producer
) -> None:
    with pytest.raises(Exception, match="route"):
        _send(producer, b"x", topic="nope")  # the client hides the code behind its route query
    with grpc.insecure_channel(emu.endpoint) as channel:
        stub = MessagingServiceStub(channel)
        route = stub.QueryRoute(QueryRouteRequest(topic={"name": "nope"}), timeout=5)
        assert route.status.code == Code.TOPIC_NOT_FOUND
        request = SendMessageRequest()
        message = request.messages.add()
        message.topic.name = "nope"
        message.body = b"x"
        message.system_properties.message_id = "01ABC"
        sent = stub.SendMessage(request, timeout=5)
        assert sent.status.code == Code.TOPIC_NOT_FOUND
        found = stub.QueryRoute(QueryRouteRequest(topic={"name": "jobs"}), timeout=5)
        assert found.status.code == Code.OK and found.message_queues


def test_an_invisible_duration_below_the_proxy_minimum_is_refused(
    producer: Producer, consumer: Callable[..., SimpleConsumer]
) -> None:
    receiver = consumer("workers")
    _send(producer, b"job")
    with pytest.raises(BadRequestException, match=str(Code.ILLEGAL_INVISIBLE_TIME)):
        receiver.receive(1, 5)


def test_telemetry_echoes_settings_merged_as_the_proxy_does(emu: RocketMQEmulator) -> None:
    command = TelemetryCommand()
    command.settings.client_type = ClientType.PRODUCER
    command.settings.publishing.topics.add(name="jobs")
    with grpc.insecure_channel(emu.endpoint) as channel:
        stream = MessagingServiceStub(channel).Telemetry(
            iter([command]), metadata=[("x-mq-client-id", "c1")], timeout=5
        )
        [answer] = list(stream)
    assert answer.status.code == Code.OK
    assert answer.settings.publishing.max_body_size == 4 * 1024 * 1024
    assert answer.settings.publishing.validate_message_type
    assert answer.settings.backoff_policy.max_attempts == 3
    assert not answer.settings.metric.on


def test_an_outage_keeps_messages_and_a_restarted_proxy_forgets_client_settings(
    emu: RocketMQEmulator, producer: Producer, consumer: Callable[..., SimpleConsumer]
) -> None:
    receiver = consumer("workers")
    _send(producer, b"before")
    emu.stop()
    with pytest.raises(Exception):  # noqa: B017 - the client raises what gRPC gives it
        _send(producer, b"during")
    emu.start()
    deadline = time.monotonic() + 60
    while True:  # gRPC reconnects after its own backoff: the first sends may still fail
        try:
            _send(producer, b"after")  # same port, same topics
            break
        except Exception:
            assert time.monotonic() < deadline, "the producer never reached the proxy again"
            time.sleep(0.5)
    # The proxy lost this consumer's settings with its memory, and this client only sends
    # them again every 5 minutes: receives fail until a new client registers.
    with pytest.raises(Exception, match="50001|null"):
        receiver.receive(5, 15)
    fresh = consumer("workers")
    got = _receive_all(fresh, 2)
    assert sorted(m.body for m in got) == [b"after", b"before"]
