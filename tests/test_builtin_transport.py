"""The built-in transport's requests: a burst of runs reaches each node in one request.

The manager side is real (`Dispatcher`, `BuiltinTransport`, `RunTracker`, `BuiltinRegistry`,
on SQLite and MariaDB); the nodes are stand-ins, small real HTTP servers recording every
request, because the point is what goes over the wire, and because one of them plays a node
of an older version (no `/jobs/batch` route), which no process of this version can be. Real
nodes receive batches in tests/test_end_to_end.py and tests/test_node_daemon.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from sqlalchemy import Engine, select

from ays_runtime.config import BuiltinRegistrySettings, BuiltinTransportSettings
from ays_runtime.manager.dispatch import Dispatcher
from ays_runtime.manager.runs import RunTracker
from ays_runtime.protocol import Heartbeat
from ays_runtime.registry.builtin import BuiltinRegistry
from ays_runtime.storage.models import JobLog, RunStatus
from ays_runtime.transport.base import JobDispatch
from ays_runtime.transport.http import BuiltinTransport
from tests.stand_in import JsonServer
from tests.test_runs import claimed_runs
from tests.test_scheduler import MANAGER


class StandInNode:
    """Answers like a node: `current` takes batches, `old` has only POST /jobs, `small`
    refuses every batch as too large (413), `broken` answers 500 to everything. Records
    (path, body) of every request."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._server = JsonServer(self._answer).start()
        self.port = self._server.port

    def close(self) -> None:
        self._server.stop()

    def paths(self) -> list[str]:
        with self._lock:
            return [path for path, _ in self.requests]

    def _answer(
        self, path: str, body: dict[str, Any], _headers: Mapping[str, str]
    ) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append((path, body))
        if self.kind == "broken":
            return 500, {"detail": "node exploded"}
        if path == "/api/v1/jobs/batch":
            if self.kind == "old":
                return 404, {"detail": "Not Found"}
            if self.kind == "small":
                return 413, {"detail": "the request body is larger than this route takes"}
            runs = [{"job_log_id": r["job_log_id"], "status_code": 202} for r in body["runs"]]
            return 200, {"runs": runs}
        return 202, {"job_log_id": body["job_log_id"], "duplicate": False}


@pytest.fixture
def stand_ins() -> Iterator[list[StandInNode]]:
    started: list[StandInNode] = []
    yield started
    for node in started:
        node.close()


class NodeClosingIdleConnections:
    """A node whose HTTP server takes a batch on a new connection and answers it keep-alive,
    then drops that connection the moment the next request arrives on it, before any byte of
    answer (a reset): a node closing an idle connection just as the manager reuses it.
    `taken` lists the job-log ids it accepted, in order."""

    def __init__(self) -> None:
        self.taken: list[int] = []
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as stream:
            body = _read_request(stream)
            if body is None:
                return
            ids = [run["job_log_id"] for run in body["runs"]]
            self.taken.extend(ids)
            answer = json.dumps(
                {"runs": [{"job_log_id": i, "status_code": 202} for i in ids]}
            ).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(answer)}\r\n\r\n".encode()
                + answer
            )
            _read_request(stream)  # the next request on this connection: dropped unanswered
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _read_request(stream: Any) -> dict[str, Any] | None:
    """One HTTP request's JSON body from `stream`; None at the end of the connection."""
    length = 0
    line = stream.readline()
    if not line:
        return None
    while line not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        line = stream.readline()
    return dict(json.loads(stream.read(length)))


def dispatch(
    engine: Engine, nodes: list[Any], jobs: list[JobDispatch], *later: list[JobDispatch]
) -> None:
    """Register `nodes` as online in group g and hand `jobs` to a real Dispatcher over a
    BuiltinTransport, then each burst of `later` once the one before it is dispatched."""
    registry = BuiltinRegistry(
        engine, BuiltinRegistrySettings(backend="builtin", heartbeat_interval=5), MANAGER
    )
    for node in nodes:
        registry.record_heartbeat(Heartbeat(ip="127.0.0.1", port=node.port, node_group="g"))

    async def run() -> None:
        async def redispatch(again: list[JobDispatch]) -> None:
            raise AssertionError(f"no retry expected: {again}")

        tracker = RunTracker(engine, MANAGER, excerpt_bytes=1024, redispatch=redispatch)
        transport = BuiltinTransport(
            BuiltinTransportSettings(backend="builtin", dispatch_timeout=5),
            access_token="t0k3n",
            report_to="http://127.0.0.1:1",
        )
        dispatcher = Dispatcher(registry, tracker, transport)
        await registry.start()
        await dispatcher.start()
        try:
            await dispatcher.dispatch(jobs)
            for burst in later:
                await _settled(engine, jobs)
                await dispatcher.dispatch(burst)
            await dispatcher.stop(10)
        finally:
            await registry.stop()

    asyncio.run(run())


async def _settled(engine: Engine, jobs: list[JobDispatch], timeout: float = 30) -> None:
    ids = {job.job_log_id for job in jobs}
    for _ in range(int(timeout / 0.05)):
        if all(rows(engine)[i][0] != RunStatus.PENDING.value for i in ids):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"runs {sorted(ids)} still pending after {timeout}s")


def rows(engine: Engine) -> dict[int, tuple[str, str | None, str]]:
    with engine.connect() as conn:
        result = conn.execute(select(JobLog.id, JobLog.status, JobLog.node, JobLog.message))
        return {r.id: (r.status, r.node, r.message) for r in result}


def test_a_burst_goes_to_each_node_in_one_request(
    engine: Engine, stand_ins: list[StandInNode]
) -> None:
    stand_ins.extend([StandInNode("current"), StandInNode("current")])
    jobs = claimed_runs(engine, 10, route_strategy="round_robin")
    dispatch(engine, stand_ins, jobs)
    for node in stand_ins:
        assert node.paths() == ["/api/v1/jobs/batch"]
        assert len(node.requests[0][1]["runs"]) == 5
    stored = rows(engine)
    for job in jobs:
        status, node, _ = stored[job.job_log_id]
        assert status == RunStatus.DISPATCHED.value
    nodes = [stored[job.job_log_id][1] for job in jobs]
    assert sorted(set(nodes)) == sorted(f"127.0.0.1:{n.port}" for n in stand_ins)
    assert nodes[0::2] == [nodes[0]] * 5 and nodes[1::2] == [nodes[1]] * 5  # round robin


@pytest.mark.parametrize("kind", ["old", "small"], ids=["older-node", "batch-too-large"])
def test_a_node_of_an_older_version_or_refusing_the_batch_as_too_large_gets_runs_one_by_one(
    engine: Engine, stand_ins: list[StandInNode], kind: str
) -> None:
    stand_ins.append(StandInNode(kind))
    jobs = claimed_runs(engine, 4)
    dispatch(engine, stand_ins, jobs)
    assert stand_ins[0].paths() == ["/api/v1/jobs/batch"] + ["/api/v1/jobs"] * 4
    sent = sorted(body["job_log_id"] for path, body in stand_ins[0].requests[1:])
    assert sent == sorted(job.job_log_id for job in jobs)
    assert {rows(engine)[job.job_log_id][0] for job in jobs} == {RunStatus.DISPATCHED.value}


def test_a_refused_batch_fails_each_run_naming_the_node_and_its_answer(
    engine: Engine, stand_ins: list[StandInNode]
) -> None:
    stand_ins.append(StandInNode("broken"))
    jobs = claimed_runs(engine, 3)
    dispatch(engine, stand_ins, jobs)
    assert stand_ins[0].paths() == ["/api/v1/jobs/batch"]
    for job in jobs:
        status, _, message = rows(engine)[job.job_log_id]
        assert status == RunStatus.FAILED.value
        assert f"127.0.0.1:{stand_ins[0].port}: HTTP 500" in message
        assert "node exploded" in message


def test_a_dispatch_meeting_a_connection_the_node_just_closed_is_sent_again_and_runs_once(
    engine: Engine,
) -> None:
    node = NodeClosingIdleConnections()
    try:
        runs = claimed_runs(engine, 6)
        first, second = runs[:3], runs[3:]
        dispatch(engine, [node], first, second)
    finally:
        node.close()
    stored = rows(engine)
    assert {stored[job.job_log_id][0] for job in first + second} == {RunStatus.DISPATCHED.value}
    assert node.taken == [job.job_log_id for job in first + second]  # each once
    assert node.connections == 2  # the second burst went again on a new connection
