"""RocketMQ dispatch end to end: a real manager and two real nodes (subprocesses) exchange jobs
and results through the RocketMQ proxy emulator (in this process), with the built-in
registry and SQLite."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.daemons import (
    CLUSTER_SECRET,
    assert_each_outage_logged_once,
    client,
    free_port,
    manager,
    wait_for,
    write_config,
)
from tests.emulators.rocketmq import RocketMQEmulator
from tests.test_end_to_end import (
    FINAL,
    Cluster,
    _kill_marked,
    add_task,
    finished_runs,
    online_nodes,
    runs,
    trigger,
)

PREFIX = "ays_"
GROUP_TOPIC = "ays_g1"
BROADCAST_TOPIC = "ays_g1_bcast"
RESULT_TOPIC = "ays_result"

pytestmark = pytest.mark.slow


@pytest.fixture
def emu() -> Iterator[RocketMQEmulator]:
    with RocketMQEmulator(topics=[GROUP_TOPIC, BROADCAST_TOPIC, RESULT_TOPIC]) as emulator:
        yield emulator


@pytest.fixture
def cluster(tmp_path: Path, sqlite_url: str, emu: RocketMQEmulator) -> Iterator[Cluster]:
    manager_port = free_port()
    config = rocketmq_config(tmp_path, sqlite_url, manager_port, emu.endpoint)
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
            15,
            "both nodes online",
        )
        yield ays
    finally:
        for daemon in ays.nodes.values():
            daemon.kill()
        ays.manager.kill()
        _kill_marked(str(tmp_path))


def rocketmq_config(tmp_path: Path, storage_url: str, manager_port: int, endpoint: str) -> Path:
    """tests.daemons.write_config with `transport: rocketmq` on `endpoint` and log dirs in
    tmp_path (the RocketMQ client writes its log file there)."""
    path = write_config(
        tmp_path / "ays.yaml",
        storage_url,
        manager_port,
        tmp_path,
        manager={"log_dir": str(tmp_path / "log" / "manager")},
        node={"max_concurrent_jobs": 4, "log_dir": str(tmp_path / "log" / "node")},
    )
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config["transport"] = {
        "backend": "rocketmq",
        "endpoints": [endpoint],
        "topic_prefix": PREFIX,
        "result_topic": RESULT_TOPIC,
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _holder(ays: Cluster, job_log_id: int) -> str | None:
    """The node that holds run `job_log_id` now (its output endpoint knows it)."""
    for name, port in ays.node_ports.items():
        daemon = ays.nodes.get(name)
        if daemon is None or daemon.proc is None or daemon.proc.poll() is not None:
            continue
        with client(port, CLUSTER_SECRET) as api:  # a node takes only the cluster secret
            try:
                if api.get(f"/jobs/{job_log_id}/output").status_code == 200:
                    return name
            except httpx.HTTPError:
                continue
    return None


def test_a_fired_job_travels_by_rocketmq_runs_on_a_node_and_its_result_is_stored(
    cluster: Cluster, emu: RocketMQEmulator
) -> None:
    task = add_task(cluster, "echo hello from $AYS_JOB_ID")
    job_log_id = trigger(cluster, task)
    [run] = finished_runs(cluster, task, 1)
    assert run["status"] == "succeeded", run
    assert run["output"].strip() == f"hello from {job_log_id}"
    assert run["node"] in {cluster.address("a"), cluster.address("b")}
    [message] = emu.messages(GROUP_TOPIC)
    assert message["keys"] == [str(job_log_id)] and message["tag"] == "shell"
    request = json.loads(message["body"])
    assert request["job_log_id"] == job_log_id and request["task_id"] == task
    [result] = emu.messages(RESULT_TOPIC)
    assert json.loads(result["body"])["status"] == "succeeded"
    # Each message is acked after its work is stored: wait for the acks, not a moment.
    wait_for(lambda: emu.in_flight(GROUP_TOPIC, "ays_g1") == 0, 30, "the job's message acked")
    wait_for(lambda: emu.in_flight(RESULT_TOPIC, "ays_manager") == 0, 30, "the result acked")
    client_logs = list((cluster.tmp / "log").rglob("rocketmq_client.log"))
    assert {p.parent.name for p in client_logs} == {"manager", "node"}
    assert not list(cluster.tmp.rglob(".rocketmq-client-home*")), "no scratch HOME left"
    assert not list(cluster.tmp.rglob("rocketmq_python")), "nothing in the client's own place"


def test_a_node_killed_mid_run_is_node_lost_and_its_redelivered_message_is_not_run_again(
    cluster: Cluster, emu: RocketMQEmulator
) -> None:
    """The run was claimed by the node that died: the redelivered message finds it held
    (then ended node_lost) and is acked unrun; the retry policy runs the slot again."""
    marks = cluster.tmp / "marks.txt"
    task = add_task(
        cluster,
        f"echo start >> {marks}; sleep 4; echo done >> {marks}",
        timeout_s=10,  # the message stays hidden 10 + 10 s, then goes to another node
        retry_count=1,
        retry_interval_s=0.5,
        allow_concurrent_retry=True,  # the host is gone: no process of it can still run
    )
    trigger(cluster, task)
    running = wait_for(
        lambda: next((r for r in runs(cluster, task) if r["status"] == "running"), None),
        20,
        "the run to start",
    )
    victim = next(n for n in ("a", "b") if cluster.address(n) == running["node"])
    survivor = "b" if victim == "a" else "a"
    wait_for(lambda: marks.exists(), 10, "the job to start")
    cluster.nodes[victim].kill()  # SIGKILL: no result, no ack
    _kill_marked(str(marks))  # and its job, as if the whole host went away
    lost, retried = finished_runs(cluster, task, 2, timeout=60)
    assert (lost["status"], lost["node"]) == ("node_lost", cluster.address(victim))
    assert (retried["status"], retried["node"]) == ("succeeded", cluster.address(survivor))
    assert retried["attempt"] == 1
    wait_for(lambda: emu.deliveries(GROUP_TOPIC, "ays_g1") >= 3, 60, "the redelivery")
    wait_for(lambda: emu.in_flight(GROUP_TOPIC, "ays_g1") == 0, 30, "every job message acked")
    assert marks.read_text().split() == ["start", "start", "done"]
    assert len(runs(cluster, task)) == 2


def test_a_job_whose_ack_was_lost_comes_back_and_is_not_run_again_its_result_republished(
    cluster: Cluster, emu: RocketMQEmulator
) -> None:
    assert cluster.nodes["b"].stop() == 0  # one node: the redelivery comes back to it
    marks = cluster.tmp / "ran.txt"
    task = add_task(cluster, f"echo $AYS_JOB_ID >> {marks}", timeout_s=1)  # hidden 11 s
    emu.refuse_acks(GROUP_TOPIC, 1)  # the node's ack of the job, not the manager's of the result
    job_log_id = trigger(cluster, task)
    [run] = finished_runs(cluster, task, 1)
    assert run["status"] == "succeeded"
    wait_for(lambda: emu.deliveries(GROUP_TOPIC, "ays_g1") == 2, 30, "the redelivery")
    wait_for(lambda: emu.in_flight(GROUP_TOPIC, "ays_g1") == 0, 10, "the second ack")
    assert marks.read_text().split() == [str(job_log_id)], "ran once"
    results = [json.loads(m["body"]) for m in emu.messages(RESULT_TOPIC)]
    assert [r["job_log_id"] for r in results] == [job_log_id, job_log_id], "published again"
    assert len(runs(cluster, task)) == 1


def test_a_broadcast_reaches_every_node_with_its_shard(
    cluster: Cluster, emu: RocketMQEmulator
) -> None:
    task = add_task(
        cluster, "echo shard $AYS_SHARD_INDEX of $AYS_SHARD_TOTAL", route_strategy="broadcast"
    )
    trigger(cluster, task)
    done = finished_runs(cluster, task, 2)
    assert [r["status"] for r in done] == ["succeeded", "succeeded"]
    assert {r["node"] for r in done} == {cluster.address("a"), cluster.address("b")}
    assert sorted(r["output"].strip() for r in done) == ["shard 0 of 2", "shard 1 of 2"]
    tags = sorted(m["tag"] for m in emu.messages(BROADCAST_TOPIC))
    assert tags == sorted(f"n_127_0_0_1_{cluster.node_ports[n]}" for n in ("a", "b"))
    assert emu.messages(GROUP_TOPIC) == []


def unsucceeded(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a failing assertion shows: the runs that did not succeed, with why."""
    keys = ("id", "status", "node", "attempt", "message")
    return [tuple(r[k] for k in keys) for r in rows if r["status"] != "succeeded"]


def test_fires_during_a_30s_proxy_outage_each_run_once_after_it_returns(
    cluster: Cluster, emu: RocketMQEmulator
) -> None:
    marks = cluster.tmp / "ran.txt"
    task = add_task(cluster, f"echo $AYS_JOB_ID >> {marks}", schedule="@every 2s")
    finished_runs(cluster, task, 1, timeout=20)
    emu.stop()
    outage_started = time.monotonic()
    time.sleep(30)
    fired_during = [r for r in runs(cluster, task) if r["status"] == "pending"]
    emu.start()
    assert time.monotonic() - outage_started >= 30
    assert len(fired_during) >= 10, "the manager kept firing while the proxy was away"
    with client(cluster.manager_port) as api:
        assert api.post(f"/tasks/{task}/disable").status_code == 200

    def all_final() -> list[dict[str, object]] | None:
        rows = runs(cluster, task)
        return rows if all(r["status"] in FINAL for r in rows) else None

    rows = wait_for(all_final, 90, "every fire of the outage to run", interval=0.5)
    assert {r["status"] for r in rows} == {"succeeded"}, unsucceeded(rows)
    ids = {str(r["id"]) for r in rows}
    ran = Counter(marks.read_text().split())
    assert set(ran) == ids and set(ran.values()) == {1}, "each fire ran once"
    assert_each_outage_logged_once(
        cluster.manager.log(), "cannot publish to RocketMQ", "RocketMQ takes jobs again"
    )
    for daemon in (cluster.manager, *cluster.nodes.values()):
        assert "exception calling callback" not in daemon.log(), "in rocketmq_client.log"


def test_a_node_stops_cleanly_and_its_consumers_leave_the_proxy(
    cluster: Cluster, emu: RocketMQEmulator
) -> None:
    started = time.monotonic()
    assert cluster.nodes["a"].stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 20, "a node with no runs stops promptly"
    assert emu.calls("NotifyClientTermination") >= 2  # its two consumers said goodbye


def test_a_running_job_whose_node_no_result_has_named_is_killed_through_the_manager(
    cluster: Cluster,
) -> None:
    task = add_task(cluster, "echo started; sleep 300")
    job_log_id = trigger(cluster, task)
    holder = wait_for(lambda: _holder(cluster, job_log_id), 20, "a node to hold the run")
    # The start claim names the node while it runs (with RocketMQ the broker chose it).
    assert (runs(cluster, task)[0]["status"], runs(cluster, task)[0]["node"]) == (
        "running",
        cluster.address(holder),
    )
    with cluster.api() as api:
        response = api.post(f"/job-logs/{job_log_id}/kill", json={"reason": "stop it"}, timeout=90)
    assert response.status_code == 202, response.text
    assert response.json()["detail"] == f"killed on node {cluster.address(holder)}"
    [run] = finished_runs(cluster, task, 1)
    assert (run["status"], run["node"]) == ("killed", cluster.address(holder))
    assert "stop it" in run["message"]


def test_sends_whose_answers_were_lost_are_delivered_twice_and_every_job_runs_once(
    cluster: Cluster, emu: RocketMQEmulator
) -> None:
    """1 send answer in 5 lost: the client sends again and both copies reach the group,
    often on both nodes at once; the start claim lets one copy run."""
    marks = cluster.tmp / "ran.txt"
    emu.drop_send_answers(GROUP_TOPIC, every=5)
    task = add_task(cluster, f"echo $AYS_JOB_ID >> {marks}; sleep 0.2")
    ids = [trigger(cluster, task) for _ in range(40)]
    ran = finished_runs(cluster, task, len(ids), timeout=120)
    wait_for(lambda: emu.in_flight(GROUP_TOPIC, "ays_g1") == 0, 60, "every copy acked")
    assert emu.answers_dropped >= 5
    assert len(emu.messages(GROUP_TOPIC)) >= len(ids) + 5, "the broker kept both copies"
    assert {r["status"] for r in ran} == {"succeeded"}, unsucceeded(ran)
    counts = Counter(marks.read_text().split())
    assert sorted(int(i) for i in counts) == sorted(ids)
    assert set(counts.values()) == {1}, counts
