"""A manager and two nodes as real processes on 127.0.0.1 (embedded default backends)."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, insert

from ays_runtime.scheduler.firing import Fire, claim_slots
from ays_runtime.scheduler.ownership import owner_of
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import Manager
from tests.daemons import (
    CLUSTER_SECRET,
    TOKEN,
    Daemon,
    client,
    free_port,
    manager,
    node,
    wait_for,
    write_config,
)

FINAL = {"succeeded", "failed", "timed_out", "killed", "node_lost", "skipped", "discarded"}


@dataclass
class Cluster:
    tmp: Path
    config: Path
    manager_port: int
    manager: Daemon
    nodes: dict[str, Daemon]
    node_ports: dict[str, int]

    def api(self) -> httpx.Client:
        return client(self.manager_port)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.node_ports[name]}"

    def start_node(self, name: str) -> Daemon:
        port = self.node_ports[name]
        daemon = node(self.config, self.tmp / f"{name}-{time.monotonic_ns()}.log", "g1", port)
        self.nodes[name] = daemon.start()
        return daemon

    def restart_manager(self) -> None:
        assert self.manager.stop() == 0, self.manager.log()
        self.manager = manager(self.config, self.tmp / "manager2.log", self.manager_port).start()


@pytest.fixture
def cluster(tmp_path: Path, sqlite_url: str) -> Iterator[Cluster]:
    manager_port = free_port()
    config = write_config(
        tmp_path / "ays.yaml", sqlite_url, manager_port, tmp_path, node={"max_concurrent_jobs": 4}
    )
    ays = Cluster(
        tmp_path,
        config,
        manager_port,
        manager(config, tmp_path / "manager.log", manager_port).start(),
        {},
        {"a": free_port(), "b": free_port()},
    )
    try:
        with ays.api() as api:
            assert api.post("/node-groups", json={"name": "g1"}).status_code == 201
        for name in ("a", "b"):
            ays.start_node(name)
        wait_for(
            lambda: online_nodes(ays) == {ays.address("a"), ays.address("b")},
            45,
            "both nodes online",
        )
        yield ays
    finally:
        for daemon in ays.nodes.values():
            daemon.kill()
        ays.manager.kill()
        _kill_marked(str(tmp_path))


def _kill_marked(marker: str) -> None:
    """Jobs of a SIGKILLed node outlive it (nothing was left to kill them): clean them up.
    The marker is the test's full tmp path: its base name alone is the same in another
    pytest session running at once, whose processes it would kill."""
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or []):
            proc.kill()


def online_nodes(ays: Cluster) -> set[str]:
    with ays.api() as api:
        items = api.get("/nodes", params={"status": "online"}).json()["items"]
    return {f"{n['ip']}:{n['port']}" for n in items}


def add_task(ays: Cluster, command: str, **fields: Any) -> int:
    body = {
        "name": fields.pop("name", f"t-{uuid.uuid4().hex[:8]}"),
        "node_group": "g1",
        "schedule": fields.pop("schedule", "0 0 0 1 1 *"),  # yearly: tests trigger by hand
        "task_type": "shell",
        "payload": {"command": command},
        **fields,
    }
    with ays.api() as api:
        response = api.post("/tasks", json=body)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def trigger(ays: Cluster, task: int, params: str | None = None) -> int:
    with ays.api() as api:
        response = api.post(f"/tasks/{task}/trigger", json={"params": params} if params else {})
    assert response.status_code == 202, response.text
    return int(response.json()["job_log_id"])


def runs(ays: Cluster, task: int) -> list[dict[str, Any]]:
    with ays.api() as api:
        items = api.get("/job-logs", params={"task_id": task, "limit": 100}).json()["items"]
    return sorted(items, key=lambda r: r["id"])


def finished_runs(ays: Cluster, task: int, count: int, timeout: float = 20) -> list[dict[str, Any]]:
    def done() -> list[dict[str, Any]] | None:
        got = [r for r in runs(ays, task) if r["status"] in FINAL]
        return got if len(got) >= count else None

    return wait_for(done, timeout, f"{count} finished runs of task {task}", interval=0.2)


def test_a_fired_task_runs_on_a_node_and_its_log_row_has_exit_code_and_output(
    cluster: Cluster,
) -> None:
    task = add_task(cluster, "echo out-$AYS_PARAMS; echo err >&2; exit 3", schedule="* * * * * *")
    first = finished_runs(cluster, task, 1)[0]
    assert first["trigger"] == "cron" and first["status"] == "failed"
    assert first["exit_code"] == 3
    assert "out-" in first["output"] and "err" in first["output"]
    assert first["node"] in {cluster.address("a"), cluster.address("b")}
    assert first["started_at"] and first["ended_at"]


def test_a_timeout_kills_the_job_and_every_process_it_spawned(cluster: Cluster) -> None:
    # Unusual durations mark the job's processes: children, a grandchild, a setsid escapee.
    durations = [f"3{cluster.node_ports['a'] % 100}.{i}1" for i in range(4)]
    a, b, c, d = durations
    task = add_task(
        cluster, f"sleep {a} & sh -c 'sleep {b}' & setsid sleep {c} & sleep {d}", timeout_s=1
    )
    trigger(cluster, task)
    run = finished_runs(cluster, task, 1)[0]
    assert run["status"] == "timed_out", run

    def survivors() -> list[int]:
        return [
            p.pid
            for p in psutil.process_iter(["cmdline", "status"])
            if (p.info["cmdline"] or [""])[-1] in durations
            and p.info["status"] != psutil.STATUS_ZOMBIE
        ]

    wait_for(lambda: not survivors(), 10, "no process of the job left")


def test_a_lost_run_of_a_task_allowing_concurrent_retries_is_retried_on_the_other_node(
    cluster: Cluster,
) -> None:
    marker = str(cluster.tmp)
    task = add_task(
        cluster,
        f"sleep 4 # {marker}",
        retry_count=1,
        retry_interval_s=0.5,
        allow_concurrent_retry=True,
    )
    trigger(cluster, task)
    running = wait_for(
        lambda: [r for r in runs(cluster, task) if r["status"] == "running"], 10, "the run started"
    )[0]
    victim = next(n for n in ("a", "b") if cluster.address(n) == running["node"])
    cluster.nodes[victim].proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    lost, retried = finished_runs(cluster, task, 2, timeout=30)
    assert lost["status"] == "node_lost" and lost["node"] == running["node"]
    assert retried["attempt"] == 1 and retried["status"] == "succeeded"
    assert retried["node"] != running["node"]
    assert retried["scheduled_at"] == lost["scheduled_at"]


def psutil_alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _job_processes(marker: str, pgids: set[int]) -> list[psutil.Process]:
    """Live processes whose command line holds `marker` or whose process group is one of
    `pgids` (a job's, found while it ran: its sleeps carry no marker)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(marker in part for part in proc.info["cmdline"] or []) or (
                os.getpgid(proc.pid) in pgids
            ):
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def test_a_node_killed_mid_run_ends_its_jobs_when_it_restarts_and_no_retry_runs_beside_them(
    cluster: Cluster,
) -> None:
    marker = f"{cluster.tmp}/job"
    # Attempt 0 runs long and leaves a child shell of its own; the retry ends at once.
    task = add_task(
        cluster,
        f'if [ "$AYS_ATTEMPT" = 0 ]; then sh -c "sleep 300; :" {marker}/child & sleep 300; fi '
        f"# {marker}",
        retry_count=3,  # a dispatch may fail on a connection gone idle (issue 12, item 1)
        retry_interval_s=0.5,
    )
    trigger(cluster, task)
    running = wait_for(
        lambda: [r for r in runs(cluster, task) if r["status"] == "running"], 30, "the run started"
    )[0]
    procs = wait_for(
        lambda: (found := _job_processes(marker, set())) and len(found) >= 2 and found,
        60,
        "the job's shell and its child",
    )
    pgids = {os.getpgid(p.pid) for p in procs}
    (shell,) = [p for p in procs if p.pid in pgids]  # the job's shell leads its group
    victim = next(n for n in ("a", "b") if cluster.address(n) == running["node"])
    cluster.nodes[victim].kill()  # SIGKILL

    # The fault: the job outlives its node (the parent-death signal ends its shell only).
    wait_for(
        lambda: not psutil_alive(shell), 60, "the job's shell ended by its parent-death signal"
    )
    lost = wait_for(
        lambda: [r for r in runs(cluster, task) if r["status"] == "node_lost"], 60, "node_lost"
    )[0]
    assert lost["node"] == running["node"]
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # while the orphan lives, the slot is not run again
        assert _job_processes(f"{marker}/child", set()), "the orphaned child is gone already"
        retry = [r for r in runs(cluster, task) if r["attempt"] >= 1]
        assert all(r["status"] == "pending" for r in retry), retry
        time.sleep(0.3)

    cluster.start_node(victim)
    wait_for(lambda: not _job_processes(marker, pgids), 120, "no process of the job left")
    wait_for(
        lambda: [r for r in runs(cluster, task) if r["status"] == "succeeded"],
        120,
        "the held retry to run once the node reported the old run ended",
    )
    first, *retries = runs(cluster, task)
    assert first["status"] == "node_lost" and retries[-1]["status"] == "succeeded", retries


def test_broadcast_reaches_both_nodes_with_their_shard_index_and_total(cluster: Cluster) -> None:
    task = add_task(
        cluster, "echo shard=$AYS_SHARD_INDEX/$AYS_SHARD_TOTAL", route_strategy="broadcast"
    )
    trigger(cluster, task)
    shards = finished_runs(cluster, task, 2)
    assert {r["node"] for r in shards} == {cluster.address("a"), cluster.address("b")}
    assert sorted(r["output"].strip() for r in shards) == ["shard=0/2", "shard=1/2"]
    assert {(r["shard_index"], r["shard_total"]) for r in shards} == {(0, 2), (1, 2)}
    assert len({r["scheduled_at"] for r in shards}) == 1


def test_trigger_wait_on_a_broadcast_waits_for_every_shard_and_exits_with_a_failing_ones_code(
    cluster: Cluster,
) -> None:
    from tests.test_cli import cli

    name = f"t-{uuid.uuid4().hex[:8]}"
    add_task(
        cluster,
        "echo shard $AYS_SHARD_INDEX; exit $((AYS_SHARD_INDEX * 3))",
        name=name,
        route_strategy="broadcast",
    )
    url = f"http://127.0.0.1:{cluster.manager_port}"
    done = cli("task", "trigger", name, "--wait", "--url", url, AYS_TOKEN=TOKEN)
    assert done.returncode == 3, done.stderr  # shard 1's code; shard 0 succeeded
    assert done.stdout.split("\n")[:2] == ["shard 0", "shard 1"], done.stdout
    as_json = cli("task", "trigger", name, "--wait", "--json", "--url", url, AYS_TOKEN=TOKEN)
    shards = json.loads(as_json.stdout)
    assert [(r["shard_index"], r["status"]) for r in shards] == [(0, "succeeded"), (1, "failed")]


@pytest.mark.parametrize(
    ("strategy", "expect"),
    [
        ("first", lambda nodes, a, b: set(nodes) == {a}),
        ("round_robin", lambda nodes, a, b: nodes[:4] in ([a, b, a, b], [b, a, b, a])),
        ("consistent_hash", lambda nodes, a, b: len(set(nodes)) == 1),
        ("random", lambda nodes, a, b: set(nodes) == {a, b}),
    ],
)
def test_each_routing_strategy_picks_nodes_as_documented(
    cluster: Cluster, strategy: str, expect: Any
) -> None:
    task = add_task(cluster, "true", route_strategy=strategy)
    for _ in range(16 if strategy == "random" else 4):
        trigger(cluster, task)
        time.sleep(0.05)  # one at a time: the order is part of what is checked
    done = finished_runs(cluster, task, 16 if strategy == "random" else 4)
    nodes = [r["node"] for r in done]
    first_node = min(cluster.address("a"), cluster.address("b"))
    other = max(cluster.address("a"), cluster.address("b"))
    assert expect(nodes, first_node, other), nodes


def test_least_busy_sends_a_run_to_the_node_without_work(cluster: Cluster) -> None:
    long_task = add_task(cluster, "sleep 3", route_strategy="least_busy")
    trigger(cluster, long_task)
    busy = wait_for(
        lambda: [r for r in runs(cluster, long_task) if r["status"] == "running"], 10, "busy"
    )[0]["node"]
    task = add_task(cluster, "true", route_strategy="least_busy")
    trigger(cluster, task)
    assert finished_runs(cluster, task, 1)[0]["node"] != busy


def test_failover_tries_the_next_node_when_the_first_is_unreachable(cluster: Cluster) -> None:
    first_name = min(("a", "b"), key=cluster.address)
    cluster.nodes[first_name].proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    cluster.nodes[first_name].proc.wait(5)  # type: ignore[union-attr]
    failover = add_task(cluster, "true", route_strategy="failover")
    plain = add_task(cluster, "true", route_strategy="first")
    trigger(cluster, failover)
    trigger(cluster, plain)
    assert finished_runs(cluster, failover, 1)[0]["status"] == "succeeded"
    refused = finished_runs(cluster, plain, 1)[0]
    assert refused["status"] == "failed" and "dispatch failed" in refused["message"]


def test_discard_new_skips_a_run_while_the_previous_one_is_still_going(cluster: Cluster) -> None:
    task = add_task(cluster, "sleep 2", block_strategy="discard_new")
    trigger(cluster, task)
    time.sleep(0.5)
    trigger(cluster, task)
    done = finished_runs(cluster, task, 2)
    assert sorted(r["status"] for r in done) == ["discarded", "succeeded"]


def test_a_node_with_the_wrong_token_is_refused_and_never_goes_online(
    cluster: Cluster, tmp_path: Path
) -> None:
    bad = write_config(
        tmp_path / "bad.yaml",
        "sqlite:///unused.db",
        cluster.manager_port,
        tmp_path / "bad",
        token="wrong-token-for-tests",
        cluster_secret="wrong-secret-for-tests",
    )
    port = free_port()
    intruder = node(bad, tmp_path / "intruder.log", "g1", port).start()
    try:
        time.sleep(2)
        assert f"127.0.0.1:{port}" not in online_nodes(cluster)
        assert "refused POST /api/v1/nodes/heartbeat" in cluster.manager.log()
        assert "wrong-token-for-tests" not in cluster.manager.log()
        assert "wrong-secret-for-tests" not in cluster.manager.log()
    finally:
        intruder.kill()


def test_a_result_held_by_a_node_during_a_manager_restart_arrives_after_it(
    cluster: Cluster,
) -> None:
    task = add_task(cluster, "sleep 2; echo survived")
    job = trigger(cluster, task)
    wait_for(lambda: runs(cluster, task)[0]["status"] == "running", 10, "the run started")
    cluster.manager.stop()
    time.sleep(3)  # the job ends while no manager listens: the node spools the result
    cluster.manager = manager(
        cluster.config, cluster.tmp / "manager2.log", cluster.manager_port
    ).start()
    run = finished_runs(cluster, task, 1, timeout=45)[0]
    assert run["id"] == job and run["status"] == "succeeded"
    assert "survived" in run["output"]


def test_a_retry_waiting_its_backoff_through_a_manager_restart_runs_once_when_due(
    cluster: Cluster,
) -> None:
    marker = cluster.tmp / "failed-once"
    task = add_task(
        cluster,
        f"if [ -e {marker} ]; then echo second; else touch {marker}; exit 7; fi",
        retry_count=2,
        retry_interval_s=6,
    )
    first = trigger(cluster, task)
    waiting = wait_for(
        lambda: [r for r in runs(cluster, task) if r["attempt"] == 1] or None,
        20,
        "the retry's pending row",
        interval=0.2,
    )[0]
    assert waiting["status"] == "pending" and waiting["due_at"] is not None
    assert [r["status"] for r in runs(cluster, task) if r["id"] == first] == ["failed"]
    cluster.restart_manager()  # while the retry waits its 6 s
    done = finished_runs(cluster, task, 2, timeout=45)
    assert [(r["attempt"], r["status"]) for r in done] == [(0, "failed"), (1, "succeeded")]
    retry = done[1]
    assert retry["id"] == waiting["id"] and "second" in retry["output"]
    started = datetime.fromisoformat(retry["started_at"])
    assert started >= datetime.fromisoformat(waiting["due_at"])  # not before its backoff
    first_manager_log = (cluster.tmp / "manager.log").read_text()
    assert "1 retry waiting: kept in the database for the next start" in first_manager_log


def test_the_result_batch_route_answers_each_result_as_the_single_route_would(
    cluster: Cluster,
) -> None:
    task = add_task(cluster, "sleep 3; echo late")
    running = trigger(cluster, task)
    wait_for(lambda: runs(cluster, task)[0]["status"] == "running", 10, "the run started")
    report = {
        "job_log_id": running,
        "node": runs(cluster, task)[0]["node"],  # a node ends only a run it holds
        "status": "succeeded",
        "exit_code": 0,
        "output": "from the batch",
    }
    batch = [
        report,
        {**report, "output": "a second report of the same run"},
        {**report, "job_log_id": 987654},
        {**report, "job_log_id": running, "status": "running"},
    ]
    with cluster.api() as api:
        response = api.post("/job-logs/results", json={"results": batch})
    assert response.status_code == 200, response.text
    answers = [(a["job_log_id"], a["status_code"], a["stored"]) for a in response.json()["results"]]
    assert answers == [
        (running, 200, True),
        (running, 200, False),  # a duplicate: accepted, ignored
        (987654, 404, False),
        (running, 422, False),
    ]
    assert "not a final run status" in response.json()["results"][3]["detail"]
    time.sleep(3.5)  # the node's own report arrives and is ignored
    stored = runs(cluster, task)[0]
    assert (stored["status"], stored["output"]) == ("succeeded", "from the batch")


def kill(ays: Cluster, job_log_id: int, reason: str | None = None) -> httpx.Response:
    with ays.api() as api:
        body = {"reason": reason} if reason else None
        return api.post(f"/job-logs/{job_log_id}/kill", json=body, timeout=90)


def test_killing_a_running_job_through_the_manager_ends_its_whole_process_group(
    cluster: Cluster,
) -> None:
    pidfile = cluster.tmp / "child.pid"
    task = add_task(cluster, f"sleep 300 & echo $! > {pidfile}; echo started; wait")
    job = trigger(cluster, task)
    child = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 15, "child"))
    assert psutil.pid_exists(child)
    response = kill(cluster, job, "the operator said stop")
    assert response.status_code == 202, response.text
    answer = response.json()
    node = runs(cluster, task)[0]["node"]
    assert (answer["killed"], answer["status"]) == (True, "killed")
    assert answer["detail"] == f"killed on node {node}"
    run = finished_runs(cluster, task, 1)[0]
    assert run["status"] == "killed" and "the operator said stop" in run["message"]
    wait_for(lambda: not psutil.pid_exists(child), 10, "the job's child process to be gone")
    again = kill(cluster, job)
    assert again.status_code == 409 and "already ended" in again.json()["error"]
    assert kill(cluster, 987654).status_code == 404


def test_killing_a_retry_that_waits_its_backoff_cancels_it(cluster: Cluster) -> None:
    task = add_task(cluster, "exit 3", retry_count=1, retry_interval_s=3)
    trigger(cluster, task)
    waiting = wait_for(
        lambda: [r for r in runs(cluster, task) if r["attempt"] == 1] or None,
        20,
        "the retry's pending row",
        interval=0.1,
    )[0]
    response = kill(cluster, waiting["id"], "no more tries")
    assert response.status_code == 202, response.text
    assert response.json()["detail"] == "ended before it was dispatched"
    time.sleep(4)  # past the retry's due time
    statuses = [(r["attempt"], r["status"]) for r in runs(cluster, task)]
    assert statuses == [(0, "failed"), (1, "killed")]
    assert runs(cluster, task)[1]["node"] == ""  # never sent to a node


def test_the_pending_runs_of_a_manager_gone_silent_are_adopted_and_run_and_no_others(
    cluster: Cluster, sqlite_url: str
) -> None:
    task = add_task(cluster, "echo adopted by $AYS_JOB_ID")
    engine = create_engine(sqlite_url)
    now = utcnow().replace(microsecond=0)
    # The live managers share the tasks and each adopts for its own (scheduler/ownership.py):
    # the alive peer gets an id that leaves this task to the real manager.
    real = f"127.0.0.1:{cluster.manager_port}"
    alive = next(
        f"10.9.9.8:{port}"
        for port in range(18080, 18280)
        if owner_of(task, sorted([real, f"10.9.9.8:{port}"])) == real
    )
    managers = {
        "10.9.9.9:18080": now - timedelta(minutes=10),  # silent: its host died
        alive: now + timedelta(hours=1),  # alive (seen "later" than any tick)
    }
    try:
        with engine.begin() as conn:
            for manager_id, seen in managers.items():
                conn.execute(
                    insert(Manager).values(
                        manager_id=manager_id, version="0", started_at=seen, last_seen=seen
                    )
                )
        claimed = {
            who: claim_slots(engine, who, [Fire(task, now - timedelta(seconds=i))], now)[0]
            for i, who in enumerate([*managers, "10.9.9.7:18080"])  # the last: no liveness row
        }
        adopted = claimed["10.9.9.9:18080"].job_log_id
        run = wait_for(
            lambda: next(
                (r for r in runs(cluster, task) if r["id"] == adopted and r["status"] in FINAL),
                None,
            ),
            30,
            "the silent manager's run to be adopted and run",
            interval=0.2,
        )
        assert run["status"] == "succeeded" and run["output"] == f"adopted by {adopted}\n"
        assert run["manager_id"] == f"127.0.0.1:{cluster.manager_port}"
        time.sleep(6)  # another liveness tick: the others stay where they are
        others = {r["id"]: r for r in runs(cluster, task) if r["id"] != adopted}
        for who in (alive, "10.9.9.7:18080"):
            row = others[claimed[who].job_log_id]
            assert (row["status"], row["manager_id"]) == ("pending", who)
        assert "adopted 1 pending run(s) of silent manager(s) 10.9.9.9:18080" in (
            cluster.manager.log()
        )
    finally:
        engine.dispose()


def test_a_node_joining_a_group_that_does_not_exist_creates_it_and_tasks_can_then_use_it(
    tmp_path: Path, database_url: str
) -> None:
    """As xxl-job's executors register their app name: no POST /node-groups first."""
    manager_port, node_port = free_port(), free_port()
    config = write_config(tmp_path / "ays.yaml", database_url, manager_port, tmp_path)
    the_manager = manager(config, tmp_path / "manager.log", manager_port).start()
    the_node = node(config, tmp_path / "node.log", "joined_group", node_port)
    try:
        with client(manager_port) as api:
            early = api.post("/tasks", json=_hello("joined_group"))
            assert early.status_code == 422, early.text
            assert early.json()["field"] == "node_group"
            assert "no node has joined it yet" in early.json()["error"]
            assert "start a node with -g joined_group" in early.json()["error"]

            the_node.start()
            group = wait_for(
                lambda: (
                    api.get("/node-groups/joined_group").json().get("auto_created") is True
                    and api.get("/node-groups/joined_group").json()
                ),
                30,
                "the group created by the node's heartbeat",
            )
            assert group["description"] == f"created when node 127.0.0.1:{node_port} joined it"
            made = api.post("/node-groups", json={"name": "by_hand"}).json()
            assert made["auto_created"] is False

            task = api.post("/tasks", json=_hello("joined_group"))
            assert task.status_code == 201, task.text
            fired = api.post(f"/tasks/{task.json()['id']}/trigger", json={}).json()
            run = wait_for(
                lambda: (
                    (r := api.get(f"/job-logs/{fired['job_log_id']}").json())["status"] in FINAL
                    and r
                ),
                30,
                "the run finished",
            )
        assert run["status"] == "succeeded", run
        assert "node group joined_group created" in the_manager.log()
    finally:
        if the_node.proc is not None:
            the_node.stop()
        the_manager.stop()


def _hello(group: str) -> dict[str, Any]:
    return {
        "name": f"hello-{group}",
        "node_group": group,
        "schedule": "0 0 0 1 1 *",
        "task_type": "shell",
        "payload": {"command": "echo hello"},
    }


def test_tasks_every_5s_cross_the_idle_keep_alive_boundary_without_a_failed_dispatch(
    cluster: Cluster,
) -> None:
    """The manager reuses a connection to each node about every 5 s: exactly the idle time
    after which both libraries' defaults close it. The client's idle time is now below the
    server's, and a send that met a closed connection goes again: none fails."""
    tasks = [
        add_task(cluster, "true", schedule="*/5 * * * * *", route_strategy="round_robin")
        for _ in range(3)
    ]
    time.sleep(120)
    with cluster.api() as api:
        for task in tasks:
            api.patch(f"/tasks/{task}", json={"enabled": False})
    ran = [r for task in tasks for r in runs(cluster, task)]
    assert len(ran) >= 3 * 20, len(ran)
    failed = [
        r for r in ran if r["status"] not in ("succeeded", "pending", "dispatched", "running")
    ]
    assert failed == [], failed


def test_a_running_job_shows_running_with_its_node_and_start_time(cluster: Cluster) -> None:
    task = add_task(cluster, "sleep 3")
    job_log_id = trigger(cluster, task)

    def listed() -> dict[str, Any] | None:
        with cluster.api() as api:
            items = api.get("/job-logs", params={"status": "running", "task_id": task}).json()
        return next((r for r in items["items"] if r["id"] == job_log_id), None)

    row = wait_for(listed, 20, "the run listed as running")
    assert row["node"] in {cluster.address("a"), cluster.address("b")}
    assert row["started_at"]
    [run] = finished_runs(cluster, task, 1)
    assert (run["status"], run["node"]) == ("succeeded", row["node"])


def test_a_run_sent_by_a_manager_killed_before_recording_it_runs_once_when_sent_again(
    cluster: Cluster, sqlite_url: str
) -> None:
    """The manager sent the run to node b, then died before it recorded the dispatch: the
    row is still pending, so the restarted manager sends it again (to a node of its choice).
    Whichever copy claims the start first runs; the other is not run."""
    marks = cluster.tmp / "ran.txt"
    task = add_task(cluster, f"echo $AYS_JOB_ID >> {marks}; sleep 1")  # route: first
    trigger(cluster, task)  # learn which node `first` picks: the copy before the kill goes
    [probe] = finished_runs(cluster, task, 1)  # to the other one
    other = next(name for name in ("a", "b") if cluster.address(name) != probe["node"])
    marks.unlink()
    manager_id = f"127.0.0.1:{cluster.manager_port}"
    cluster.manager.kill()  # SIGKILL, right after "sending"
    engine = create_engine(sqlite_url)
    try:
        now = utcnow().replace(microsecond=0)
        [job] = claim_slots(engine, manager_id, [Fire(task, now)], now)
    finally:
        engine.dispose()
    request = job.run_request(f"http://{manager_id}").model_dump(mode="json")
    with client(cluster.node_ports[other], CLUSTER_SECRET) as node:
        assert node.post("/jobs", json=request).status_code == 202
    cluster.manager = manager(cluster.config, cluster.tmp / "manager2.log", cluster.manager_port)
    cluster.manager.start()
    run = finished_runs(cluster, task, 2, timeout=60)[1]
    assert run["id"] == job.job_log_id and run["status"] == "succeeded"
    logs = [d.log() for d in cluster.nodes.values()]
    wait_for(
        lambda: any(
            f"run {job.job_log_id} not run here" in text
            or f"run {job.job_log_id} is already here" in text
            for text in [d.log() for d in cluster.nodes.values()]
        ),
        30,
        "the second copy to be turned away",
    )
    assert marks.read_text().split() == [str(job.job_log_id)], logs
