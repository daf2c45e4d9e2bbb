"""The node's job executor, run for real: real shells, real process trees, a real HTTP server.

Each test drives the executor with `asyncio.run` (no pytest-asyncio here). Kill graces are
short so that the whole file stays within seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from ays_runtime.exceptions import ValidationError
from ays_runtime.node import Executor, JobResult, JobSpec
from ays_runtime.node.output import OutputBuffer

T = TypeVar("T")


def make_executor(**overrides: Any) -> Executor:
    settings: dict[str, Any] = {
        "max_concurrent": 4,
        "output_cap_bytes": 65_536,
        "excerpt_bytes": 1024,
        "kill_grace": 0.3,
        "pipe_grace": 0.2,
    }
    settings.update(overrides)
    return Executor(**settings)


def shell(command: str, job_id: int = 1, timeout_s: float = 0, **payload: Any) -> JobSpec:
    return JobSpec(
        job_id=job_id,
        task_id=7,
        task_type="shell",
        payload={"command": command, **payload},
        timeout_s=timeout_s,
    )


def http(url: str, job_id: int = 1, timeout_s: float = 0, **payload: Any) -> JobSpec:
    return JobSpec(
        job_id=job_id,
        task_id=8,
        task_type="http",
        payload={"url": url, **payload},
        timeout_s=timeout_s,
    )


def run_once(spec: JobSpec) -> JobResult:
    """Run one job on a new executor, then close the executor (its HTTP client)."""

    async def main() -> JobResult:
        executor = make_executor()
        try:
            return await executor.run(spec)
        finally:
            await executor.aclose()

    return asyncio.run(main())


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_all_gone(pids: set[int], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while survivors := {pid for pid in pids if alive(pid)}:
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of the job survived: {sorted(survivors)}")
        time.sleep(0.05)


def printed_pids(output: bytes | None) -> set[int]:
    """The pids a job printed as `pid N` lines (none yet when it has not started)."""
    output = output or b""
    return {
        int(line.split()[1]) for line in output.decode().splitlines() if line.startswith("pid ")
    }


def job_tree(root: int) -> set[int]:
    return {root} | {p.pid for p in psutil.Process(root).children(recursive=True)}


def sleeps_under(root: int) -> int:
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    return sum(1 for p in children if p.name() == "sleep")


# --- shell jobs -------------------------------------------------------------------------------


def test_echo_output_is_captured_with_exit_code_zero() -> None:
    executor = make_executor()
    result = run(executor.run(shell("echo hello; echo oops >&2")))

    assert result.status == "succeeded"
    assert result.exit_code == 0
    assert result.output_excerpt == "hello\noops\n"
    assert not result.output_truncated
    assert result.output_bytes == 11
    assert result.started_at is not None and result.started_at <= result.ended_at
    assert executor.output(1) == b"hello\noops\n"
    assert executor.result(1) == result


def test_a_non_zero_exit_is_failed_with_its_code() -> None:
    result = run(make_executor().run(shell("echo about to fail; exit 3")))

    assert result.status == "failed"
    assert result.exit_code == 3
    assert result.message == "exited with code 3"
    assert result.output_excerpt == "about to fail\n"


def test_env_workdir_and_ays_variables_reach_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AYS_NODE_SECRET", "s3cret")
    spec = JobSpec(
        job_id=41,
        task_id=7,
        task_type="shell",
        payload={
            "command": 'pwd -P; echo "$GREETING|$AYS_JOB_ID|$AYS_TASK_ID|$AYS_PARAMS|'
            "$AYS_SHARD_INDEX/$AYS_SHARD_TOTAL|$AYS_ATTEMPT|$AYS_SCHEDULED_AT|"
            '${AYS_NODE_SECRET-not inherited}"',
            "env": {"GREETING": "hello", "AYS_JOB_ID": "spoofed"},
            "workdir": str(tmp_path),
        },
        params="--full",
        shard_index=2,
        shard_total=3,
        attempt=1,
        scheduled_at="2024-05-01T10:00:00",
    )
    result = run(make_executor().run(spec))

    assert result.status == "succeeded", result.message
    assert result.output_excerpt.splitlines() == [
        str(tmp_path.resolve()),
        "hello|41|7|--full|2/3|1|2024-05-01T10:00:00|not inherited",
    ]


def test_a_missing_workdir_is_a_failed_result_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = run(make_executor().run(shell("true", workdir=str(missing))))

    assert result.status == "failed"
    assert result.message == f"workdir {missing} does not exist"
    assert result.exit_code is None


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        ({}, "payload.command"),
        ({"command": "true", "env": {"A": ["list"]}}, "payload.env.A"),
        ({"command": "true", "env": {"NOT-A-NAME": "x"}}, "payload.env"),
        ({"command": "true", "workdir": "relative/dir"}, "workdir relative/dir"),
    ],
)
def test_a_bad_shell_payload_is_a_failed_result_naming_the_field(
    payload: dict[str, Any], named: str
) -> None:
    spec = JobSpec(job_id=1, task_id=7, task_type="shell", payload=payload)
    result = run(make_executor().run(spec))

    assert result.status == "failed"
    assert named in result.message


def test_an_unknown_task_type_is_a_failed_result() -> None:
    spec = JobSpec(job_id=1, task_id=7, task_type="ftp", payload={})
    result = run(make_executor().run(spec))

    assert result.status == "failed"
    assert "task_type 'ftp'" in result.message


def test_output_larger_than_the_cap_is_bounded_and_marked_truncated() -> None:
    executor = make_executor(output_cap_bytes=4096, excerpt_bytes=1024)
    command = "head -c 300000 /dev/zero | tr '\\0' x; echo; echo THE END"
    result = run(executor.run(shell(command)))

    assert result.status == "succeeded"
    assert result.output_bytes == 300_000 + 1 + 8
    assert result.output_truncated
    assert len(result.output_excerpt.encode()) <= 1024
    assert result.output_excerpt.startswith("[ays: first ")
    assert result.output_excerpt.endswith("xxx\nTHE END\n")
    kept = executor.output(1)
    assert kept is not None
    assert len(kept) <= 4096 + 64
    assert kept.startswith(b"xxxx")
    assert b"bytes of output not kept" in kept
    assert kept.endswith(b"xxx\nTHE END\n")


GRANDCHILDREN = """
sleep 300 & echo "pid $!"
sleep 300 & echo "pid $!"
sh -c 'echo "pid $$"; sh -c "echo pid \\$\\$; sleep 300; true"; true' & echo "pid $!"
setsid sleep 300 & echo "pid $!"
echo "pid $$"
wait
"""


def test_a_timeout_kills_a_job_and_every_process_it_spawned(tmp_path: Path) -> None:
    (tmp_path / "job.sh").write_text(GRANDCHILDREN)
    executor = make_executor()
    spec = shell("sh ./job.sh", timeout_s=2, workdir=str(tmp_path))
    pids: set[int] = set()
    detached: set[int] = set()

    async def scenario() -> JobResult:
        job = asyncio.create_task(executor.run(spec))
        await until(lambda: len(printed_pids(executor.output(1))) >= 6)
        root = max(printed_pids(executor.output(1)), key=lambda pid: len(job_tree(pid)))
        await until(lambda: sleeps_under(root) == 4)  # two plain, one nested, one setsid
        pids.update(job_tree(root) | printed_pids(executor.output(1)))
        detached.update(pid for pid in pids if os.getsid(pid) != os.getsid(root))
        return await job

    result = run(scenario())

    assert result.status == "timed_out"
    assert result.message.startswith("timed out after 2s")
    assert len(pids) >= 7  # the script's shell, four sleeps, two nested shells
    assert len(detached) == 1  # the setsid one, out of reach of the process group
    assert_all_gone(pids)


def test_kill_ends_a_running_job_as_killed() -> None:
    executor = make_executor()

    async def scenario() -> tuple[bool, JobResult, bool]:
        job = asyncio.create_task(executor.run(shell('echo "pid $$"; sleep 300; true')))
        await until(lambda: executor.is_running(1) and bool(printed_pids(executor.output(1))))
        killed = await executor.kill(1)
        return killed, await job, await executor.kill(1)

    killed, result, killed_again = run(scenario())

    assert killed
    assert result.status == "killed"
    assert result.message.startswith("killed by operator")
    assert result.exit_code == 128 + 15
    assert not killed_again  # no longer running
    assert_all_gone(printed_pids(executor.output(1)))


def test_a_job_that_ignores_sigterm_is_sigkilled_after_the_grace() -> None:
    executor = make_executor(kill_grace=0.3)
    spec = shell("trap '' TERM; echo \"pid $$\"; sleep 300; true", timeout_s=0.5)
    result = run(executor.run(spec))

    assert result.status == "timed_out"
    assert "SIGKILL after 0.3s grace" in result.message
    assert result.exit_code == 128 + 9
    assert_all_gone(printed_pids(executor.output(1)))


def test_processes_a_command_leaves_running_are_ended_when_it_exits() -> None:
    executor = make_executor()
    result = run(executor.run(shell('sleep 300 & echo "pid $!"; echo done')))

    assert result.status == "succeeded"
    assert "processes it left running were ended" in result.message
    assert_all_gone(printed_pids(executor.output(1)))


def test_no_more_than_max_concurrent_jobs_run_at_once() -> None:
    executor = make_executor(max_concurrent=2)
    seen: list[tuple[int, int]] = []

    async def scenario() -> list[JobResult]:
        jobs = [asyncio.create_task(executor.run(shell("sleep 0.5", job_id=i))) for i in range(4)]
        while not all(job.done() for job in jobs):
            seen.append((executor.running, executor.waiting))
            await asyncio.sleep(0.02)
        return [job.result() for job in jobs]

    results = run(scenario())

    assert [r.status for r in results] == ["succeeded"] * 4
    assert max(running for running, _ in seen) == 2
    assert (2, 2) in seen  # two ran while two waited
    # The slot-holding intervals themselves never overlap more than two deep.
    for r in results:
        assert r.started_at is not None
        overlapping = [
            o
            for o in results
            if o.started_at is not None and o.started_at <= r.started_at < o.ended_at
        ]
        assert len(overlapping) <= 2
    assert (executor.running, executor.waiting) == (0, 0)


def test_a_job_killed_while_waiting_for_a_slot_never_starts(tmp_path: Path) -> None:
    executor = make_executor(max_concurrent=1)
    marker = tmp_path / "started"

    async def scenario() -> tuple[JobResult, JobResult]:
        first = asyncio.create_task(executor.run(shell("sleep 300", job_id=1)))
        second = asyncio.create_task(executor.run(shell(f"touch {marker}", job_id=2)))
        await until(lambda: executor.is_running(1) and executor.waiting == 1)
        assert not executor.is_running(2)
        assert await executor.kill(2)
        assert await executor.kill(1)
        return await first, await second

    first, second = run(scenario())

    assert first.status == "killed"
    assert second.status == "killed"
    assert second.started_at is None
    assert second.message == "killed by operator (before it started)"
    assert not marker.exists()


def test_the_same_job_id_runs_once_however_often_it_is_delivered(tmp_path: Path) -> None:
    executor = make_executor()
    log = tmp_path / "runs"
    spec = shell(f"echo ran >> {log}; sleep 0.2")

    async def scenario() -> list[JobResult]:
        together = await asyncio.gather(executor.run(spec), executor.run(spec))
        return [*together, await executor.run(spec)]

    results = run(scenario())

    assert log.read_text() == "ran\n"
    assert results[0] is results[1] is results[2]


def test_drain_waits_for_running_jobs_and_kill_all_ends_them() -> None:
    executor = make_executor()

    async def scenario() -> tuple[bool, int, bool, list[JobResult]]:
        jobs = [asyncio.create_task(executor.run(shell("sleep 300", job_id=i))) for i in (1, 2)]
        jobs.append(asyncio.create_task(executor.run(shell("sleep 0.1", job_id=3))))
        await until(lambda: executor.running == 3)
        drained_early = await executor.drain(0.5)
        killed = await executor.kill_all()
        drained = await executor.drain(1.0)
        return drained_early, killed, drained, [await job for job in jobs]

    drained_early, killed, drained, results = run(scenario())

    assert not drained_early
    assert killed == 2
    assert drained
    assert [r.status for r in results] == ["killed", "killed", "succeeded"]
    assert results[0].message.startswith("killed: node shutting down")


def test_bad_settings_are_refused_naming_the_setting() -> None:
    with pytest.raises(ValidationError, match="max_concurrent"):
        Executor(max_concurrent=0)


# --- HTTP jobs --------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    release: threading.Event

    def _answer(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        received = self.rfile.read(length)
        if self.path == "/ok":
            self._answer(200, b"all good")
        elif self.path == "/boom":
            self._answer(500, b"it broke")
        elif self.path == "/echo":
            seen = {
                "method": self.command,
                "token": self.headers.get("X-Token"),
                "body": received.decode(),
            }
            self._answer(201, json.dumps(seen).encode())
        elif self.path == "/slow":
            self.release.wait(10)
            self._answer(200, b"late")
        elif self.path == "/set-cookie":
            self.send_response(200)
            self.send_header("Set-Cookie", "session=of-another-task; Path=/")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/whoami":
            seen = {"cookie": self.headers.get("Cookie"), "port": self.client_address[1]}
            self._answer(200, json.dumps(seen).encode())
        else:
            self._answer(404, b"no such page")

    do_GET = do_POST = do_PUT = _route

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    release = threading.Event()
    handler = type("Handler", (_Handler,), {"release": release})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_an_http_job_that_gets_its_expected_status_succeeds(server: str) -> None:
    result = run_once(http(f"{server}/ok"))

    assert result.status == "succeeded", result.message
    assert result.exit_code is None
    assert result.output_excerpt == "HTTP/1.1 200 OK\nall good"
    assert result.message == "HTTP 200"


def test_an_http_job_sends_method_headers_and_json_body(server: str) -> None:
    spec = http(
        f"{server}/echo",
        method="post",
        headers={"X-Token": "t0k"},
        body={"n": 1},
        expected_status=[201, 202],
    )
    result = run_once(spec)

    assert result.status == "succeeded", result.message
    seen = json.loads(result.output_excerpt.split("\n", 1)[1])
    assert seen == {"method": "POST", "token": "t0k", "body": '{"n":1}'}


def test_an_http_500_is_failed_with_the_status_in_the_message(server: str) -> None:
    result = run_once(http(f"{server}/boom", expected_status=200))

    assert result.status == "failed"
    assert result.message == "HTTP 500, expected 200"
    assert result.output_excerpt.endswith("it broke")


def test_an_http_job_that_cannot_connect_is_failed_naming_the_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/nobody-home"
    result = run_once(http(url))

    assert result.status == "failed"
    assert f"GET {url}: cannot connect" in result.message


def test_an_http_job_over_its_timeout_is_timed_out(server: str) -> None:
    result = run_once(http(f"{server}/slow", timeout_s=0.5))

    assert result.status == "timed_out"
    assert result.message == "timed out after 0.5s"


def test_http_jobs_share_connections_but_never_cookies(server: str) -> None:
    executor = make_executor(http_keep_alive=60.0)  # not timing: a loaded machine may be slow

    async def scenario() -> list[JobResult]:
        try:
            results = [await executor.run(http(f"{server}/set-cookie", job_id=1))]
            for job_id in (2, 3):
                results.append(await executor.run(http(f"{server}/whoami", job_id=job_id)))
            return results
        finally:
            await executor.aclose()

    results = run(scenario())

    assert [r.status for r in results] == ["succeeded"] * 3, [r.message for r in results]
    seen = [json.loads(r.output_excerpt.split("\n", 1)[1]) for r in results[1:]]
    assert seen[0]["cookie"] is None and seen[1]["cookie"] is None
    assert seen[0]["port"] == seen[1]["port"]  # the second job reused the first's connection


def test_kill_ends_a_running_http_job(server: str) -> None:
    executor = make_executor()

    async def scenario() -> tuple[bool, JobResult]:
        job = asyncio.create_task(executor.run(http(f"{server}/slow")))
        await until(lambda: executor.is_running(1))
        await asyncio.sleep(0.1)
        try:
            return await executor.kill(1, "killed: covered by a newer run"), await job
        finally:
            await executor.aclose()

    killed, result = run(scenario())

    assert killed
    assert result.status == "killed"
    assert result.message == "killed: covered by a newer run"


# --- the output buffer ------------------------------------------------------------------------


def test_an_excerpt_cut_inside_a_character_starts_on_a_whole_one() -> None:
    buffer = OutputBuffer(4096)
    buffer.write(("é" * 1000).encode())  # 2000 bytes

    text, truncated = buffer.excerpt(257)

    assert truncated
    assert len(text.encode()) <= 257
    assert "\ufffd" not in text
    assert text.endswith("éé")


def test_the_output_buffer_keeps_head_and_tail_within_its_cap() -> None:
    buffer = OutputBuffer(400)
    for i in range(10_000):
        buffer.write(f"{i:05d}\n".encode())

    kept = buffer.getvalue()

    assert buffer.total == 60_000
    assert buffer.truncated
    assert kept.startswith(b"00000\n00001\n")
    assert kept.endswith(b"09998\n09999\n")
    assert len(kept) - len(b"\n[ays: 59600 bytes of output not kept]\n") == 400


def test_reading_the_output_from_a_position_gives_only_what_came_since() -> None:
    buffer = OutputBuffer(4096)
    buffer.write(b"line 1\n")
    first, following = buffer.read_from(0)
    buffer.write(b"line 2\n")

    second, last = buffer.read_from(following)

    assert (first, following) == (b"line 1\n", 7)
    assert (second, last) == (b"line 2\n", 14)
    assert buffer.read_from(last) == (b"", 14)


def test_a_position_inside_the_dropped_middle_gets_the_marker_then_the_tail() -> None:
    buffer = OutputBuffer(400)  # head 100 bytes, tail 300
    for i in range(10_000):
        buffer.write(f"{i:05d}\n".encode())
    buffer.compact()

    from_head, end = buffer.read_from(96)
    from_gap, _ = buffer.read_from(30_000)
    from_tail, _ = buffer.read_from(60_000 - 12)

    assert end == 60_000
    assert from_head.startswith(b"0001\n[ays: 59600 bytes of output not kept]\n09950\n")
    assert from_head.endswith(b"09999\n")
    assert from_gap.startswith(b"\n[ays: 59600 bytes of output not kept]\n09950\n")
    assert from_tail == b"09998\n09999\n"
    assert buffer.kept == 400
