"""The node daemon, built-in registry and transport, as a real process on 127.0.0.1.

Each test starts `aysNode debug` as a subprocess against a stand-in manager: a small real
HTTP server in a thread that records heartbeats and result reports, and can be told to
answer results with an error status, or be stopped and started again on the same port.
Every wait is bounded; every node process is stopped (and if need be killed) in teardown.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ays_runtime.config import parse_config
from ays_runtime.node.daemon import NodeDaemon
from ays_runtime.node.spool import ResultSpool, SpooledResult
from ays_runtime.protocol import JobResultReport
from tests.daemons import assert_each_outage_logged_once
from tests.stand_in import JsonServer

TOKEN = "t0k3n-for-tests"
CLUSTER = "c1uster-secret-for-tests"  # nodes take only this (tests.daemons.CLUSTER_SECRET)
AUTH = {"Authorization": f"Bearer {CLUSTER}"}
PROGRAM = Path(sys.executable).parent / "aysNode"
READY_TIMEOUT = 20.0
RESULT_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# --- the stand-in manager ---------------------------------------------------------------------


class FakeManager:
    """Records what nodes send to the manager API; `result_status` is its answer to result
    reports (200 takes them; anything else refuses them and counts the refusal). It answers
    the batch route POST /api/v1/job-logs/results as the manager does (a status per result),
    or, with `batch_route` False, 404 as a manager of an older version would, or with
    `batch_status` 413 refuses every batch as too large. `result_posts` lists the size of every
    request that carried results. Start claims (POST /api/v1/job-logs/claims) are granted to
    the first node that asks (`claims`), refused with `claim_status` when it is not 200, or
    all lost to `claim_holder` when it is set."""

    _RESULT = re.compile(r"^/api/v1/job-logs/(\d+)/result$")

    def __init__(self) -> None:
        self.heartbeats: list[dict[str, Any]] = []
        self.heartbeat_auth: list[str] = []
        self.results: dict[int, list[dict[str, Any]]] = {}
        self.refused: dict[int, int] = {}
        self.result_status = 200
        self.batch_route = True
        self.batch_status = 200
        self.result_posts: list[int] = []
        self.claims: dict[int, str] = {}  # run -> the node that claimed it
        self.claim_status = 200
        self.claim_holder = ""  # set: every run is claimed by that node already
        self._cond = threading.Condition()
        self._server = JsonServer(self._answer)

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def wait(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        with self._cond:
            value = self._cond.wait_for(check, timeout)
        if not value:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        return value

    def result(self, job_log_id: int, timeout: float = RESULT_TIMEOUT) -> dict[str, Any]:
        """The first report of run `job_log_id`, once it has come."""
        self.wait(lambda: job_log_id in self.results, timeout, f"the result of run {job_log_id}")
        return self.results[job_log_id][0]

    def _record(self, path: str, body: dict[str, Any], auth: str) -> int:
        with self._cond:
            try:
                if path == "/api/v1/nodes/heartbeat":
                    self.heartbeats.append(body)
                    self.heartbeat_auth.append(auth)
                    return 200
                match = self._RESULT.match(path)
                if match is None:
                    return 404
                job_log_id = int(match.group(1))
                if self.result_status != 200:
                    self.refused[job_log_id] = self.refused.get(job_log_id, 0) + 1
                    return self.result_status
                self.results.setdefault(job_log_id, []).append(body)
                return 200
            finally:
                self._cond.notify_all()

    def _claim(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._cond:
            try:
                if self.claim_status != 200:
                    return self.claim_status, {"error": "the database failed"}
                answers = []
                for job_log_id in body["job_log_ids"]:
                    holder = self.claims.setdefault(job_log_id, self.claim_holder or body["node"])
                    mine = holder == body["node"]
                    answers.append(
                        {
                            "job_log_id": job_log_id,
                            "claimed": mine,
                            "status": "running",
                            "node": holder,
                        }
                    )
                return 200, {"claims": answers}
            finally:
                self._cond.notify_all()

    def _answer(
        self, path: str, body: dict[str, Any], headers: Mapping[str, str]
    ) -> tuple[int, dict[str, Any]]:
        auth = headers.get("Authorization") or ""
        if path == "/api/v1/job-logs/claims":
            return self._claim(body)
        if path != "/api/v1/job-logs/results":
            if self._RESULT.match(path):
                self.result_posts.append(1)
            return self._record(path, body, auth), {}
        if not self.batch_route:
            return 404, {"detail": "Not Found"}
        if self.batch_status != 200:
            return self.batch_status, {"error": "the request body is larger than this route takes"}
        self.result_posts.append(len(body["results"]))
        answers = []
        for report in body["results"]:
            job_log_id = report["job_log_id"]
            code = self._record(f"/api/v1/job-logs/{job_log_id}/result", report, auth)
            answers.append({"job_log_id": job_log_id, "status_code": code, "detail": ""})
        return 200, {"results": answers}


# --- the node process -------------------------------------------------------------------------


class NodeProcess:
    """`aysNode debug` in a subprocess; its log goes to a file the tests read."""

    def __init__(self, config: Path, data_dir: Path, log: Path, port: int) -> None:
        self.config = config
        self.data_dir = data_dir
        self.log_path = log
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        args = [str(PROGRAM), "debug", "-g", "g1", "--config", str(self.config)]
        args += ["-p", "127.0.0.1", "-P", str(self.port)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        wait_until(self._ready, READY_TIMEOUT, f"the node on port {self.port} to answer")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log}")
        try:
            return httpx.get(f"{self.url}/api/v1/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def spool_file(self, job_log_id: int) -> Path:
        return self.data_dir / "results" / f"{job_log_id}.json"

    def post(self, path: str, body: dict[str, Any] | None = None, **kw: Any) -> httpx.Response:
        kw.setdefault("headers", AUTH)
        return httpx.post(f"{self.url}{path}", json=body, timeout=15, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        kw.setdefault("headers", AUTH)
        return httpx.get(f"{self.url}{path}", timeout=15, **kw)

    def run(self, body: dict[str, Any]) -> httpx.Response:
        return self.post("/api/v1/jobs", body)

    def output(self, job_log_id: int) -> str:
        response = self.get(f"/api/v1/jobs/{job_log_id}/output")
        return response.text if response.status_code == 200 else ""

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Teardown: SIGTERM twice (the second kills held jobs at once), then SIGKILL."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def manager() -> Iterator[FakeManager]:
    fake = FakeManager()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def start_node(tmp_path: Path, manager: FakeManager) -> Iterator[Callable[..., NodeProcess]]:
    """start_node(**node_settings) -> a running node (same data dir and port every time)."""
    started: list[NodeProcess] = []
    port = free_port()

    def start(**node: Any) -> NodeProcess:
        data_dir = tmp_path / "node"
        config = {
            "env": "dev",
            "access_token": TOKEN,
            "cluster_secret": CLUSTER,
            "storage": {"url": f"sqlite:///{tmp_path / 'ays.db'}"},
            "registry": {"backend": "builtin", "heartbeat_interval": 0.5},
            "transport": {"backend": "builtin"},
            "manager": {"ip": "127.0.0.1", "port": manager.port, "data_dir": str(tmp_path)},
            "node": {"data_dir": str(data_dir), "kill_grace": 1, **node},
        }
        path = tmp_path / "node.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        process = NodeProcess(path, data_dir, tmp_path / "node.log", port)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


def job(
    manager: FakeManager, job_log_id: int, command: str, task_id: int = 1, **extra: Any
) -> dict[str, Any]:
    """A RunRequest body for a shell job reporting to `manager`."""
    return {
        "job_log_id": job_log_id,
        "task_id": task_id,
        "task_type": "shell",
        "payload": {"command": command},
        "scheduled_at": "2030-01-01T00:00:00",
        "report_to": manager.url,
        **extra,
    }


def accepted(response: httpx.Response, duplicate: bool = False) -> None:
    assert response.status_code == 202, response.text
    assert response.json()["duplicate"] is duplicate


# --- tests ------------------------------------------------------------------------------------


def test_a_node_heartbeats_to_the_manager_with_its_group_and_address(
    manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    node = start_node(max_concurrent_jobs=3)
    manager.wait(lambda: len(manager.heartbeats) >= 2, 10, "two heartbeats")
    beat = manager.heartbeats[-1]
    assert beat["node_group"] == "g1"
    assert (beat["ip"], beat["port"]) == ("127.0.0.1", node.port)
    assert beat["max_concurrent_jobs"] == 3
    assert manager.heartbeat_auth[-1] == f"Bearer {CLUSTER}"


def test_a_shell_job_runs_and_its_result_is_posted_to_the_manager(
    manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    node = start_node()
    accepted(node.run(job(manager, 1, "echo hello from $AYS_JOB_ID; exit 3")))
    result = manager.result(1)
    assert result["status"] == "failed"
    assert result["exit_code"] == 3
    assert result["output"] == "hello from 1\n"
    assert result["node"] == f"127.0.0.1:{node.port}"
    wait_until(lambda: not node.spool_file(1).exists(), 5, "the spool file to be deleted")


def test_the_output_endpoint_returns_what_a_job_wrote(
    manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    node = start_node()
    accepted(node.run(job(manager, 2, "echo line1; echo line2 >&2")))
    assert manager.result(2)["status"] == "succeeded"
    response = node.get("/api/v1/jobs/2/output")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "line1\nline2\n"
    assert node.get("/api/v1/jobs/999/output").status_code == 404


def test_calls_without_the_right_token_are_refused_and_logged_without_the_token(
    manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    node = start_node()
    body = job(manager, 3, "echo hi")
    assert node.post("/api/v1/jobs", body, headers={}).status_code == 401
    wrong = {"Authorization": "Bearer wrong-token"}
    assert node.post("/api/v1/jobs", body, headers=wrong).status_code == 401
    assert node.post("/api/v1/jobs", body, headers={"X-Ays-Token": "wrong"}).status_code == 401
    assert node.get("/api/v1/jobs/3/output", headers={}).status_code == 401
    assert node.post("/api/v1/jobs/3/kill", headers={}).status_code == 401
    assert node.get("/api/v1/health", headers={}).status_code == 200
    # The env's access token is an operator's credential: a node takes only the cluster secret.
    assert node.post("/api/v1/jobs", body, headers={"X-Ays-Token": TOKEN}).status_code == 401
    accepted(node.post("/api/v1/jobs", body, headers={"X-Ays-Token": CLUSTER}))
    assert manager.result(3)["status"] == "succeeded"
    log = node.log
    assert re.search(
        rf"node 127\.0\.0\.1:{node.port}: refused POST /api/v1/jobs from 127\.0\.0\.1: "
        "bad or missing access token",
        log,
    )
    assert "wrong-token" not in log and TOKEN not in log and CLUSTER not in log


def test_a_job_log_id_given_twice_runs_once(
    tmp_path: Path, manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    node = start_node()
    marks = tmp_path / "marks"
    body = job(manager, 4, f"echo ran >> {marks}; sleep 0.3")
    accepted(node.run(body))
    accepted(node.run(body), duplicate=True)  # while it runs
    manager.result(4)
    accepted(node.run(body), duplicate=True)  # after it finished
    time.sleep(0.5)
    assert marks.read_text().splitlines() == ["ran"]
    assert len(manager.results[4]) == 1


def test_a_full_node_refuses_a_job_that_must_not_queue(
    manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    node = start_node(max_concurrent_jobs=1)
    accepted(node.run(job(manager, 5, "echo busy; sleep 30")))
    wait_until(lambda: node.output(5), 5, "run 5 to start")
    refused = node.run(job(manager, 6, "echo no", task_id=2, queue_if_busy=False))
    assert refused.status_code == 429
    assert "full" in refused.json()["detail"]
    accepted(node.run(job(manager, 7, "echo later", task_id=3)))  # queue_if_busy: waits
    assert node.post("/api/v1/jobs/5/kill").json() == {"killed": True}
    assert manager.result(7)["output"] == "later\n"
    assert 6 not in manager.results


def test_a_batch_of_runs_gets_one_answer_per_run_as_post_jobs_would_give(
    tmp_path: Path, manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    node = start_node(max_concurrent_jobs=1)
    accepted(node.run(job(manager, 20, "echo first; sleep 30")))
    wait_until(lambda: node.output(20), 5, "run 20 to start")
    runs = [
        job(manager, 20, "echo again"),  # running here: a duplicate, not run again
        job(manager, 21, "echo queued", task_id=2),  # queues behind run 20
        job(manager, 22, "echo no", task_id=3, queue_if_busy=False),  # full: refused
        job(manager, 23, "echo bad", task_id=4, block_strategy="sideways"),
    ]
    answer = node.post("/api/v1/jobs/batch", {"runs": runs})
    assert answer.status_code == 200, answer.text
    by_id = {a["job_log_id"]: a for a in answer.json()["runs"]}
    assert [a["job_log_id"] for a in answer.json()["runs"]] == [20, 21, 22, 23]
    assert by_id[20]["status_code"] == 202 and by_id[20]["duplicate"] is True
    assert by_id[21]["status_code"] == 202 and by_id[21]["duplicate"] is False
    assert by_id[22]["status_code"] == 429 and "full" in by_id[22]["detail"]
    assert by_id[23]["status_code"] == 422 and "block_strategy" in by_id[23]["detail"]
    assert node.post("/api/v1/jobs/20/kill").json() == {"killed": True}
    assert manager.result(21)["output"] == "queued\n"
    assert 22 not in manager.results and 23 not in manager.results
    unauthorised = httpx.post(f"{node.url}/api/v1/jobs/batch", json={"runs": runs}, timeout=5)
    assert unauthorised.status_code == 401


@pytest.mark.parametrize(
    ("batch_route", "batch_status"),
    [(True, 200), (False, 200), (True, 413)],
    ids=["batched", "older-manager", "batch-too-large"],
)
def test_results_finishing_together_travel_together_or_one_by_one_when_a_batch_is_not_taken(
    tmp_path: Path,
    manager: FakeManager,
    start_node: Callable[..., NodeProcess],
    batch_route: bool,
    batch_status: int,
) -> None:
    manager.batch_route, manager.batch_status = batch_route, batch_status
    node = start_node(max_concurrent_jobs=8)
    go = tmp_path / "go"
    ids = list(range(30, 38))
    for i in ids:  # eight runs that end within a few ms of each other
        wait = f"while [ ! -e {go} ]; do sleep 0.01; done; echo run {i}"
        accepted(node.run(job(manager, i, wait, task_id=i)))
    wait_until(lambda: all(node.output(i) is not None for i in ids), 10, "all eight to start")
    go.touch()
    for i in ids:
        assert manager.result(i)["output"] == f"run {i}\n"
    assert sum(manager.result_posts) == len(ids)  # each result once
    if batch_route and batch_status == 200:
        assert len(manager.result_posts) < len(ids), manager.result_posts
        assert max(manager.result_posts) > 1
    else:
        assert manager.result_posts == [1] * len(ids)


def test_a_killed_job_is_reported_killed(
    manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    node = start_node()
    accepted(node.run(job(manager, 8, "echo going; sleep 30")))
    wait_until(lambda: node.output(8), 5, "run 8 to start")
    response = node.post("/api/v1/jobs/8/kill", {"reason": "stopped by the operator"})
    assert response.json() == {"killed": True}
    result = manager.result(8)
    assert result["status"] == "killed"
    assert result["message"].startswith("stopped by the operator")
    assert result["output"] == "going\n"
    assert node.post("/api/v1/jobs/8/kill").json() == {"killed": False}


def _marked(path: Path) -> str:
    return f"echo start-$AYS_JOB_ID >> {path}; sleep 0.6; echo end-$AYS_JOB_ID >> {path}"


def test_serial_runs_of_a_task_wait_for_each_other(
    tmp_path: Path, manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    node = start_node()
    marks = tmp_path / "marks"
    for job_log_id in (11, 12, 13):
        accepted(node.run(job(manager, job_log_id, _marked(marks), task_id=10)))
    assert [manager.result(i)["status"] for i in (11, 12, 13)] == ["succeeded"] * 3
    assert marks.read_text().split() == [
        "start-11",
        "end-11",
        "start-12",
        "end-12",
        "start-13",
        "end-13",
    ]


def test_discard_new_reports_the_new_run_discarded(
    tmp_path: Path, manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    node = start_node()
    marks = tmp_path / "marks"
    accepted(node.run(job(manager, 21, _marked(marks), task_id=20)))
    body = job(manager, 22, _marked(marks), task_id=20, block_strategy="discard_new")
    accepted(node.run(body))
    discarded = manager.result(22)
    assert discarded["status"] == "discarded"
    assert discarded["message"] == "previous run 21 still running"
    assert manager.result(21)["status"] == "succeeded"
    assert marks.read_text().split() == ["start-21", "end-21"]


def test_cover_old_kills_the_running_run_and_starts_the_new_one(
    tmp_path: Path, manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    node = start_node()
    marks = tmp_path / "marks"
    accepted(node.run(job(manager, 31, f"echo start-31 >> {marks}; sleep 30", task_id=30)))
    wait_until(lambda: marks.exists(), 5, "run 31 to start")
    body = job(manager, 32, _marked(marks), task_id=30, block_strategy="cover_old")
    accepted(node.run(body))
    covered = manager.result(31)
    assert covered["status"] == "killed"
    assert covered["message"].startswith("covered by run 32")
    assert manager.result(32)["status"] == "succeeded"
    assert marks.read_text().split() == ["start-31", "start-32", "end-32"]


def test_a_result_the_manager_refuses_for_a_while_is_kept_in_the_spool_until_taken(
    manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    manager.result_status = 503
    node = start_node()
    accepted(node.run(job(manager, 41, "echo kept")))
    manager.wait(lambda: manager.refused.get(41, 0) >= 1, 10, "a refused report of run 41")
    spooled = json.loads(node.spool_file(41).read_text())
    assert spooled["report"]["status"] == "succeeded"
    assert spooled["report"]["output"] == "kept\n"
    manager.result_status = 200
    assert manager.result(41)["output"] == "kept\n"
    wait_until(lambda: not node.spool_file(41).exists(), 5, "the spool file to be deleted")


def test_a_result_survives_a_manager_restart(
    manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    node = start_node()
    manager.wait(lambda: manager.heartbeats, 10, "a first heartbeat")
    accepted(node.run(job(manager, 42, "sleep 1; echo while the manager is away")))
    manager.wait(lambda: 42 in manager.claims, 10, "run 42 to be claimed")
    manager.stop()
    wait_until(lambda: node.spool_file(42).exists(), 10, "run 42 to be spooled")
    time.sleep(1.5)  # several heartbeats fail meanwhile
    manager.start()
    assert manager.result(42)["output"] == "while the manager is away\n"
    assert_each_outage_logged_once(node.log, "heartbeat to ", "heartbeats reach")


def test_a_result_the_manager_can_never_take_is_dropped_with_a_log_line(
    manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    manager.result_status = 404
    node = start_node()
    accepted(node.run(job(manager, 43, "echo unknown run")))
    manager.wait(lambda: manager.refused.get(43, 0) >= 1, 10, "a refused report of run 43")
    wait_until(lambda: not node.spool_file(43).exists(), 5, "the spool file to be deleted")
    # The file goes first, then the line is logged: wait for it, bounded.
    wait_until(lambda: "refused the result of run 43 (HTTP 404" in node.log, 5, "the log line")
    time.sleep(1.5)  # no retry follows
    assert manager.refused[43] == 1


def test_a_sigtermed_node_finishes_its_running_job_reports_it_and_exits_0(
    manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    node = start_node()
    accepted(node.run(job(manager, 51, "echo started; sleep 4; echo done")))
    wait_until(lambda: node.output(51), 5, "run 51 to start")
    node.signal(signal.SIGTERM)
    # It says it is leaving, takes the jobs sent meanwhile for LEAVE_GRACE (2 s), then drains.
    wait_until(lambda: node.get("/api/v1/health").json()["draining"], 10, "the node to drain")
    assert manager.heartbeats[-1]["state"] == "leaving"
    stopping = node.run(job(manager, 52, "echo too late", task_id=2))
    assert stopping.status_code == 503
    assert "stopping" in stopping.json()["detail"]
    assert node.wait_exit(timeout=20) == 0, node.log
    result = manager.results[51][0]  # reported before the process exited
    assert result["status"] == "succeeded"
    assert result["output"] == "started\ndone\n"
    assert "waiting up to 30s for 1 run(s) to end" in node.log


def test_a_restarted_node_sends_the_results_left_in_its_spool(
    manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    manager.result_status = 503
    node = start_node()
    accepted(node.run(job(manager, 61, "echo from the first process")))
    manager.wait(lambda: manager.refused.get(61, 0) >= 1, 10, "a refused report of run 61")
    node.signal(signal.SIGTERM)
    assert node.wait_exit(timeout=20) == 0, node.log
    assert node.spool_file(61).exists()
    manager.result_status = 200
    node = start_node()
    assert manager.result(61)["output"] == "from the first process\n"
    accepted(node.run(job(manager, 61, "echo again")), duplicate=True)
    wait_until(lambda: not node.spool_file(61).exists(), 5, "the spool file to be deleted")


def test_a_daemon_serves_the_socket_it_is_given_and_stops_when_asked(
    tmp_path: Path, manager: FakeManager
) -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = parse_config(
        {
            "env": "dev",
            "access_token": TOKEN,
            "cluster_secret": CLUSTER,
            "storage": {"url": "sqlite:///x.db"},
            "registry": {"backend": "builtin", "heartbeat_interval": 0.5},
            "transport": {"backend": "builtin"},
            "manager": {"ip": "127.0.0.1", "port": manager.port},
            "node": {"port": port, "group": "g2", "data_dir": str(tmp_path / "node")},
        },
        "test config",
    )
    daemon = NodeDaemon(config, sock)
    thread = threading.Thread(target=asyncio.run, args=(daemon.serve(),), daemon=True)
    thread.start()
    try:
        manager.wait(lambda: manager.heartbeats, 10, "a heartbeat")
        health = httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=5).json()
        assert health["address"] == f"127.0.0.1:{port}"
        assert health["node_group"] == "g2"
    finally:
        daemon.request_stop()
        thread.join(timeout=15)
    assert not thread.is_alive()


def test_a_spool_sets_unreadable_files_aside_and_drops_temp_files_of_dead_writers(
    tmp_path: Path,
) -> None:
    spool = ResultSpool(tmp_path / "results")
    report = JobResultReport(job_log_id=7, node="127.0.0.1:1", status="succeeded")
    spool.load()
    spool.put(SpooledResult("http://127.0.0.1:9", report))
    (spool.directory / "8.json").write_text("{not json")
    stale = spool.directory / ".9.json.999999999.tmp"
    stale.write_text("{}")
    [entry] = spool.load()
    assert entry.report == report and entry.report_to == "http://127.0.0.1:9"
    assert (spool.directory / "8.json.bad").exists()
    assert not stale.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", "999.1.1.1"], "'999.1.1.1' is not an IP address"),
        (["-P", "70000"], "'70000' is not a port number (1-65535)"),
        (["-P", "http"], "'http' is not a port number (1-65535)"),
        (["-g", "bad group"], "'bad group' is not a node group name"),
        ([], "no node group: give -g GROUP"),
    ],
    ids=["ip", "port-range", "port-text", "group", "no-group"],
)
def test_debug_refuses_a_bad_address_or_group_with_a_clear_error(
    tmp_path: Path, args: list[str], message: str
) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "env": "dev",
                "access_token": TOKEN,
                "cluster_secret": CLUSTER,
                "storage": {"url": "sqlite:///x.db"},
                "registry": {"backend": "builtin"},
                "transport": {"backend": "builtin"},
            }
        ),
        encoding="utf-8",
    )
    if "-g" not in args and args:
        args = [*args, "-g", "g1"]
    done = subprocess.run(
        [str(PROGRAM), "debug", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert message in " ".join(done.stderr.split()), done.stderr


def test_a_run_starts_only_once_the_manager_has_recorded_its_claim(
    manager: FakeManager, start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = start_node()
    marker = tmp_path / "ran"
    accepted(node.run(job(manager, 50, f"echo $AYS_JOB_ID >> {marker}")))
    assert manager.result(50)["status"] == "succeeded"
    assert manager.claims == {50: f"127.0.0.1:{node.port}"}
    assert marker.read_text() == "50\n"


def test_a_copy_of_a_run_another_node_claimed_is_not_run_and_not_reported(
    manager: FakeManager, start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    manager.claim_holder = "127.0.0.1:1"
    node = start_node()
    marker = tmp_path / "ran"
    accepted(node.run(job(manager, 51, f"echo ran >> {marker}")))
    wait_until(lambda: "run 51 not run here: it is running on 127.0.0.1:1" in node.log, 30, "")
    accepted(node.run(job(manager, 51, f"echo ran >> {marker}")), duplicate=True)
    assert not marker.exists()
    assert 51 not in manager.results and not node.spool_file(51).exists()


def test_a_run_no_manager_confirms_is_not_run_and_reported_failed_after_the_claim_wait(
    manager: FakeManager, start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    manager.claim_status = 503
    node = start_node(start_claim_wait=2)
    marker = tmp_path / "ran"
    accepted(node.run(job(manager, 52, f"echo ran >> {marker}")))
    result = manager.result(52, timeout=60)
    assert result["status"] == "failed"
    assert result["message"].startswith("not started: no manager confirmed the start within 2s")
    assert not marker.exists()


def test_a_shell_run_is_journaled_once_its_start_is_claimed_while_it_waits_for_a_slot(
    manager: FakeManager, start_node: Callable[..., NodeProcess]
) -> None:
    node = start_node(max_concurrent_jobs=1)
    accepted(node.run(job(manager, 62, "echo busy; sleep 30")))
    wait_until(lambda: node.output(62), 10, "run 62 to start")
    accepted(node.run(job(manager, 63, "echo later", task_id=2)))
    entry = node.data_dir / "running" / "63.json"
    wait_until(entry.exists, 10, "run 63 to be journaled while it waits")
    assert json.loads(entry.read_text())["pid"] == 0  # ahead of its spawn
    assert 63 not in manager.results
    assert node.post("/api/v1/jobs/62/kill").json() == {"killed": True}
    assert manager.result(63)["output"] == "later\n"
    wait_until(lambda: not entry.exists(), 10, "the journal entry of run 63 to go")


def test_a_run_waiting_for_a_slot_when_its_node_is_killed_is_reported_failed_at_the_next_start(
    manager: FakeManager, start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = start_node(max_concurrent_jobs=1)
    marker = tmp_path / "ran"
    accepted(node.run(job(manager, 64, "echo busy; sleep 30")))
    wait_until(lambda: node.output(64), 10, "run 64 to start")
    accepted(node.run(job(manager, 65, f"echo ran >> {marker}", task_id=2)))
    wait_until((node.data_dir / "running" / "65.json").exists, 10, "run 65 to be journaled")
    node.signal(signal.SIGKILL)
    node.wait_exit(timeout=10)
    start_node()
    failed = manager.result(65)
    assert failed["status"] == "failed"
    assert "had not started yet" in failed["message"]
    assert manager.result(64)["status"] == "failed"
    assert not marker.exists()
