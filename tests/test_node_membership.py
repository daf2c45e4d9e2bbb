"""A node's place among the managers, on real processes: a node that stops cleanly is routed
no more runs at once, a manager back from an outage trusts no node it last saw before it until
that node beats again, and a node naming several managers beats and reports to whichever
answers (two managers on one MariaDB database)."""

from __future__ import annotations

import re
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests import test_end_to_end
from tests.daemons import TOKEN, client, free_port, manager, node, wait_for, write_config
from tests.test_end_to_end import FINAL, Cluster, add_task, finished_runs, runs, trigger

cluster = test_end_to_end.cluster  # a manager on SQLite and two nodes, a and b, of group g1


def by_port(ays: Cluster) -> tuple[str, str]:
    """The node route `first` picks (the lower port: both listen on 127.0.0.1), the other."""
    first, other = sorted(ays.node_ports, key=lambda name: ays.node_ports[name])
    return first, other


def last_seen(ays: Cluster, name: str) -> datetime | None:
    with ays.api() as api:
        items = api.get("/nodes").json()["items"]
    seen = next(n["last_seen"] for n in items if n["address"] == ays.address(name))
    return None if seen is None else datetime.fromisoformat(seen.replace("Z", "+00:00"))


def test_a_node_stopped_cleanly_gets_no_more_runs_and_no_run_fails(cluster: Cluster) -> None:
    first, other = by_port(cluster)
    task = add_task(cluster, "echo ok", route_strategy="first")
    stopped = threading.Event()

    def stop() -> None:
        assert cluster.nodes[first].stop(signal.SIGTERM) == 0
        stopped.set()

    threading.Thread(target=stop).start()
    # Runs fired all through the stop (the leaving beat, the drain, the exit) and after it.
    fired = 0
    after = 0
    while after < 8:
        trigger(cluster, task)
        fired += 1
        after += stopped.is_set()
        time.sleep(0.15)
    done = finished_runs(cluster, task, fired, timeout=60)
    failed = [r for r in done if r["status"] != "succeeded"]
    assert not failed, failed
    assert [r["node"] for r in done[-8:]] == [cluster.address(other)] * 8
    with cluster.api() as api:
        nodes = {n["address"]: n["status"] for n in api.get("/nodes").json()["items"]}
    assert nodes[cluster.address(first)] == "offline"  # it said so: no missed beats needed
    assert "has left" in cluster.manager.log()


def test_a_restarted_manager_trusts_no_node_until_it_beats_again(cluster: Cluster) -> None:
    """The first node died while the manager was down, its row still says online: the
    restarted manager sends the runs to the node that beats, not to the dead one (offline
    window of 10 s here: the sweep would not have caught it yet)."""
    first, other = by_port(cluster)
    task = add_task(cluster, "echo ok", route_strategy="first")
    assert cluster.manager.stop() == 0
    cluster.nodes[first].kill()  # no leaving beat: its row says online
    time.sleep(2.5)  # longer than a heartbeat interval (0.5 s) and the trust slack (1 s)
    config = yaml.safe_load(cluster.config.read_text())
    config["registry"]["offline_after_missed"] = 20
    slow_sweep = cluster.tmp / "slow-sweep.yaml"
    slow_sweep.write_text(yaml.safe_dump(config))
    restarted = datetime.now(UTC)
    cluster.manager = manager(slow_sweep, cluster.tmp / "manager2.log", cluster.manager_port)
    cluster.manager.start()
    wait_for(
        lambda: (seen := last_seen(cluster, other)) is not None and seen > restarted,
        30,
        "the live node's first beat to the restarted manager",
    )
    with cluster.api() as api:
        nodes = {n["address"]: n["status"] for n in api.get("/nodes").json()["items"]}
    assert nodes[cluster.address(first)] == "online"  # not swept yet, but not trusted
    for _ in range(4):
        trigger(cluster, task)
        time.sleep(0.1)
    done = finished_runs(cluster, task, 4)
    assert [(r["status"], r["node"]) for r in done] == [
        ("succeeded", cluster.address(other))
    ] * 4, done
    assert runs(cluster, task) == done


@pytest.mark.parametrize("named", ["both", "learned"])
def test_a_node_beats_and_reports_to_the_other_manager_while_its_own_is_down(
    tmp_path: Path, mysql_url: str, named: str
) -> None:
    """Two managers on one database. The node names both (or only the first, and learns of
    the second from the first's heartbeat answers). The first, which dispatched runs still
    running, is killed and stays down for 4 offline windows: the node beats to the second,
    which keeps it online, and hands it the results; no run is lost or run again."""
    ports = [free_port(), free_port()]
    node_port = free_port()
    configs = [
        write_config(
            tmp_path / f"m{i}.yaml",
            mysql_url,
            port,
            tmp_path / f"m{i}",
            **(
                {"node": {"managers": [f"127.0.0.1:{p}" for p in ports]}} if named == "both" else {}
            ),
        )
        for i, port in enumerate(ports)
    ]
    managers = [
        manager(c, tmp_path / f"m{i}.log", p)
        for i, (c, p) in enumerate(zip(configs, ports, strict=True))
    ]
    the_node = node(configs[0], tmp_path / "node.log", "g1", node_port)
    try:
        for daemon in managers:
            daemon.start()
        the_node.start()
        with client(ports[0]) as first, client(ports[1]) as second:
            wait_for(
                lambda: second.get("/nodes", params={"status": "online"}).json()["total"] == 1,
                30,
                "the node online",
            )
            if named == "learned":
                wait_for(
                    lambda: f"learned of manager(s) http://127.0.0.1:{ports[1]}" in the_node.log(),
                    30,
                    "the node to learn of the second manager",
                )
            body = {
                "name": "survivor",
                "node_group": "g1",
                "schedule": "0 0 0 1 1 *",
                "task_type": "shell",
                "payload": {"command": "sleep 2; echo done"},
                "retry_count": 1,
                "retry_interval_s": 1,
            }
            task = first.post("/tasks", json=body).json()["id"]
            # Both managers route to the node (the second's view refreshes every second).
            for api in (first, second):
                probe = {
                    **body,
                    "name": f"probe-{api.base_url.port}",
                    "payload": {"command": "true"},
                    "retry_count": 10,  # until the manager's view has the node (1 s)
                }
                probe_id = api.post("/tasks", json=probe).json()["id"]
                api.post(f"/tasks/{probe_id}/trigger", json={})  # retried until it succeeds
                wait_for(
                    lambda api=api, probe_id=probe_id: any(
                        r["status"] == "succeeded"
                        for r in api.get("/job-logs", params={"task_id": probe_id}).json()["items"]
                    ),
                    30,
                    "a probe run on the node",
                )
            before = [
                first.post(f"/tasks/{task}/trigger", json={}).json()["job_log_id"] for _ in range(3)
            ]
            wait_for(
                lambda: all(
                    first.get(f"/job-logs/{i}").json()["status"] in {"dispatched", "running"}
                    for i in before
                ),
                30,
                "the runs on the node",
            )
            managers[0].kill()  # kill -9: its runs' results have nowhere to go but the other
            down_until = time.monotonic() + 6  # 4 offline windows of 1.5 s
            during = [
                second.post(f"/tasks/{task}/trigger", json={}).json()["job_log_id"]
                for _ in range(2)
            ]

            def finished() -> list[dict[str, Any]] | None:  # the task's runs, not the probes
                items = second.get("/job-logs", params={"task_id": task, "limit": 100}).json()[
                    "items"
                ]
                return items if all(r["status"] in FINAL for r in items) else None

            wait_for(finished, 60, "every run to finish")
            time.sleep(max(0.0, down_until - time.monotonic()))
            nodes = second.get("/nodes").json()["items"]
            rows = second.get("/job-logs", params={"task_id": task, "limit": 100}).json()["items"]
        shown = [(r["id"], r["status"], r["attempt"], r["message"]) for r in rows]
        assert sorted(r["id"] for r in rows) == sorted(before + during), shown  # no retry
        assert {r["status"] for r in rows} == {"succeeded"}, rows
        assert [n["status"] for n in nodes] == ["online"]
        assert f"heartbeats go to http://127.0.0.1:{ports[1]}" in the_node.log()
        assert "missed" not in managers[1].log()
    finally:
        the_node.kill()
        for daemon in managers:
            daemon.kill()


def test_a_node_reports_its_load_which_the_nodes_api_and_page_show_and_an_older_node_is_taken(
    cluster: Cluster,
) -> None:
    """Each heartbeat carries the node's 1-minute load average, CPU count and memory used;
    the manager keeps the last on the node's row. A beat without them (a node of an older
    version) is taken, its load shown as unknown; a load out of range is refused naming it."""

    def loaded() -> dict[str, Any] | None:
        with cluster.api() as api:
            items = api.get("/nodes").json()["items"]
        row = next(n for n in items if n["address"] == cluster.address("a"))
        return row if row["load_1m"] is not None else None

    row = wait_for(loaded, 30, "node a's load in the nodes API")
    assert row["load_1m"] >= 0
    assert row["cpu_count"] == psutil.cpu_count() >= 1
    assert 0 < row["memory_percent"] <= 100

    old = {"ip": "127.0.0.9", "port": 18181, "node_group": "g1", "version": "0.9"}
    with cluster.api() as api:
        assert api.post("/nodes/heartbeat", json=old).status_code == 200
        bad = api.post("/nodes/heartbeat", json={**old, "memory_percent": 250})
        assert bad.status_code == 422, bad.text
        assert "memory_percent" in bad.text
        items = api.get("/nodes").json()["items"]
    older = next(n for n in items if n["address"] == "127.0.0.9:18181")
    assert (older["status"], older["load_1m"], older["cpu_count"]) == ("online", None, None)

    with httpx.Client(base_url=f"http://127.0.0.1:{cluster.manager_port}", timeout=10) as browser:
        signed = browser.post("/login", data={"token": TOKEN, "next": "/nodes"})
        assert signed.status_code == 303, signed.text
        page = browser.get("/nodes")
    assert page.status_code == 200
    cells = {
        address: load
        for address, load in re.findall(
            r"<td>(127\.0\.0\.\d+:\d+)</td>.*?<td class=\"node-load\">([^<]*)</td>",
            page.text,
            re.S,
        )
    }
    assert re.fullmatch(r"\d+\.\d\d / \d+ CPU, mem \d+%", cells[cluster.address("a")]), cells
    assert cells["127.0.0.9:18181"] == "—"
