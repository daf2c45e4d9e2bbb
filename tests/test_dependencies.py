"""Job dependencies (issue 18) on a real manager and node: a child fires after its parents'
runs, once per slot (`all`) or once per parent run (`any`), exactly once across retries, two
managers and a manager killed mid-way; a cycle is refused; a missing parent is reported."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, insert, select, update

from ays_runtime.storage.models import JobLog, RunStatus, Task, TaskEdge
from tests.daemons import (
    BIN,
    TOKEN,
    Cluster,
    client,
    cluster,
    free_port,
    manager,
    node,
    wait_for,
    write_config,
)
from tests.test_runs import NODE, claimed_runs, report, tracker
from tests.test_scheduler import add_task

NEVER = "0 0 0 1 1 *"  # once a year: a parent fired by hand in these tests


def add(api: httpx.Client, name: str, command: str = "true", **fields: Any) -> dict[str, Any]:
    body = {"name": name, "node_group": "g1", "payload": {"command": command}, **fields}
    body.setdefault("schedule", "" if fields.get("after") else NEVER)
    response = api.post("/tasks", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def runs(api: httpx.Client, task_id: int) -> list[dict[str, Any]]:
    items = api.get("/job-logs", params={"task_id": task_id, "limit": 1000}).json()["items"]
    return list(items)


def ended(api: httpx.Client, task_id: int, status: str, count: int) -> list[dict[str, Any]]:
    found = [r for r in runs(api, task_id) if r["status"] == status]
    return found if len(found) >= count else []


def per_slot(rows: list[dict[str, Any]]) -> Counter[str]:
    return Counter(r["scheduled_at"] for r in rows if r["attempt"] == 0)


@pytest.fixture
def ays(tmp_path: Path) -> Any:
    with cluster(tmp_path, Cluster) as running:
        yield running


def test_all_fires_the_child_once_per_slot_when_both_parents_succeed_and_skips_it_when_one_fails(
    ays: Cluster,
) -> None:
    with ays.api() as api:
        root = add(api, "root", schedule="* * * * * *")
        add(api, "a", after=[{"task": "root"}])
        b = add(api, "b", after=[{"task": "root"}])
        child = add(api, "c", after=[{"task": "a"}, {"task": "b"}], after_mode="all")
        done = wait_for(lambda: ended(api, child["id"], "succeeded", 2), 60, "two child runs")
        root_slots = {r["scheduled_at"] for r in runs(api, root["id"])}
        assert {r["scheduled_at"] for r in done} <= root_slots  # the child has its parents' slot
        assert all(r["trigger"] == "dependency" for r in done)

        assert api.patch(f"/tasks/{b['id']}", json={"payload": {"command": "false"}}).is_success
        skipped = wait_for(lambda: ended(api, child["id"], "skipped", 2), 60, "two skipped slots")
        assert {r["message"] for r in skipped} == {"skipped: parent b failed"}
        assert api.post(f"/tasks/{root['id']}/disable").is_success
        wait_for(
            lambda: (
                not any(
                    r["status"] in ("pending", "dispatched", "running")
                    for t in (root["id"], b["id"], child["id"])
                    for r in runs(api, t)
                )
            ),
            30,
            "every run ended",
        )
        slots = per_slot(runs(api, child["id"]))
    assert slots and max(slots.values()) == 1  # once per slot, fired or skipped


def test_any_fires_the_child_once_per_parent_run_that_met_its_condition(ays: Cluster) -> None:
    with ays.api() as api:
        a = add(api, "a")
        b = add(api, "b", "exit 3")
        child = add(
            api,
            "c",
            after=[{"task": "a", "condition": "success"}, {"task": "b", "condition": "failure"}],
            after_mode="any",
        )
        watcher = add(api, "on_success_of_b", after=[{"task": "b"}])
        for task in (a, a, b):
            assert api.post(f"/tasks/{task['id']}/trigger", json={}).status_code == 202
        done = wait_for(lambda: ended(api, child["id"], "succeeded", 3), 60, "three child runs")
        parents = {r["scheduled_at"] for t in (a, b) for r in runs(api, t["id"])}
        assert {r["scheduled_at"] for r in done} == parents
        assert max(per_slot(runs(api, child["id"])).values()) == 1
        # b failed: its success-child has no slot at all (`any`, and `all` with one parent
        # alike: `all` skips it).
        assert all(r["status"] == "skipped" for r in runs(api, watcher["id"]))


def test_a_parent_retried_to_success_triggers_the_child_once(ays: Cluster) -> None:
    marker = ays.tmp / "failed-once"
    flaky = f"test -e {marker} || {{ touch {marker}; exit 1; }}"
    with ays.api() as api:
        parent = add(api, "flaky", flaky, retry_count=2, retry_interval_s=1.0)
        on_success = add(api, "after_ok", after=[{"task": "flaky", "condition": "success"}])
        on_failure = add(api, "after_ko", after=[{"task": "flaky", "condition": "failure"}])
        assert api.post(f"/tasks/{parent['id']}/trigger", json={}).status_code == 202
        done = wait_for(lambda: ended(api, on_success["id"], "succeeded", 1), 60, "the child")
        attempts = sorted((r["attempt"], r["status"]) for r in runs(api, parent["id"]))
        assert attempts == [(0, "failed"), (1, "succeeded")]
        assert done[0]["scheduled_at"] == runs(api, parent["id"])[0]["scheduled_at"]
        wait_for(lambda: runs(api, on_failure["id"]), 30, "the failure-child's slot decided")
        assert [r["status"] for r in runs(api, on_failure["id"])] == ["skipped"]
        assert len(runs(api, on_success["id"])) == 1


def test_a_manager_killed_after_a_parents_result_still_fires_the_child_once(
    ays: Cluster,
) -> None:
    url = f"sqlite:///{ays.tmp / 'ays.db'}"
    engine = create_engine(url)
    with ays.api() as api:
        parent = add(api, "parent", "sleep 1")
        # A retry covers a dispatch whose start no manager confirmed in time (the node's
        # start claim gives up after 60 s: a restart slower than that on a loaded machine).
        child = add(api, "child", after=[{"task": "parent"}], retry_count=2, retry_interval_s=1.0)
        assert api.post(f"/tasks/{parent['id']}/trigger", json={}).status_code == 202

    def parent_final() -> bool:
        with engine.connect() as conn:
            status = conn.execute(select(JobLog.status).where(JobLog.task_id == parent["id"]))
            return status.scalar() == "succeeded"

    wait_for(parent_final, 60, "the parent's result stored", interval=0.005)
    ays.manager.kill()  # SIGKILL, right after the result (and the child's claim) committed
    first = ays.manager.log()
    ays.manager = manager(ays.config, ays.tmp / "m2.log", ays.manager_port).start()
    with ays.api() as api:
        try:
            wait_for(lambda: ended(api, child["id"], "succeeded", 1), 150, "the child's run")
        except AssertionError:
            rows = runs(api, child["id"]) + runs(api, parent["id"])
            raise AssertionError(
                f"{rows}\n--- before the kill:\n{first[-3000:]}"
                f"\n--- after:\n{ays.manager.log()[-3000:]}"
                f"\n--- node:\n{ays.node.log()[-3000:] if ays.node else ''}"
            ) from None
        fired = runs(api, child["id"])
        assert [r["attempt"] for r in fired].count(0) == 1  # fired once
        assert [r["status"] for r in fired].count("succeeded") == 1
    engine.dispose()


def test_a_cycle_is_refused_naming_it_and_a_missing_parent_is_reported(ays: Cluster) -> None:
    with ays.api() as api:
        a = add(api, "a")
        add(api, "b", after=[{"task": "a"}])
        c = add(api, "c", after=[{"task": "b"}, {"task": "a", "condition": "always"}])
        refused = api.patch(f"/tasks/{a['id']}", json={"after": [{"task": "c"}]})
        assert refused.status_code == 422, refused.text
        assert "a -> b -> c -> a" in refused.text or "a -> c -> a" in refused.text
        assert api.get(f"/tasks/{a['id']}").json()["after"] == []
        itself = api.patch(f"/tasks/{a['id']}", json={"after": [{"task": "a"}]})
        assert itself.status_code == 422 and "after" in itself.text
        unknown = api.post(
            "/tasks",
            json={
                "name": "d",
                "node_group": "g1",
                "payload": {"command": "true"},
                "after": [{"task": "nope"}],
            },
        )
        assert unknown.status_code == 422 and "nope" in unknown.text
        by_hand = api.post(  # no schedule, no parent: run by hand or by its workflow only
            "/tasks", json={"name": "d", "node_group": "g1", "payload": {"command": "true"}}
        )
        assert by_hand.status_code == 201 and by_hand.json()["schedule"] == ""

        assert api.post(f"/tasks/{a['id']}/disable").is_success
        assert api.get(f"/tasks/{c['id']}").json()["after_problems"] == [
            "parent a is disabled: only its runs by hand fire this task"
        ]
        assert api.delete(f"/tasks/{a['id']}").is_success
        view = api.get(f"/tasks/{c['id']}").json()
        assert view["after_problems"] == ["parent a is deleted: it will not fire this task"]
    shown = subprocess.run(
        [BIN / "aysManager", "task", "show", "c", "--url", f"http://127.0.0.1:{ays.manager_port}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"AYS_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"},
    )
    assert shown.returncode == 0, shown.stderr
    assert "parent a is deleted" in shown.stdout and "b:success" in shown.stdout


def test_the_cli_adds_a_task_after_parents_and_export_apply_keep_the_edges(ays: Cluster) -> None:
    base = ["--url", f"http://127.0.0.1:{ays.manager_port}"]
    env = {"AYS_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BIN / "aysManager", *args, *base], capture_output=True, text=True, timeout=60, env=env
        )

    with ays.api() as api:
        add(api, "a")
        add(api, "b")
    added = cli(
        "task",
        "add",
        "c",
        "-g",
        "g1",
        "-c",
        "true",
        "--after",
        "a",
        "--after",
        "b:always",
        "--after-mode",
        "any",
        "--json",
    )
    assert added.returncode == 0, added.stderr
    task = json.loads(added.stdout)
    assert task["after"] == [
        {"task": "a", "condition": "success"},
        {"task": "b", "condition": "always"},
    ]
    assert task["after_mode"] == "any" and task["schedule"] == ""
    bad = cli("task", "add", "d", "-g", "g1", "-c", "true", "--after", "a:sometimes")
    assert bad.returncode != 0 and "CONDITION" in bad.stderr
    exported = ays.tmp / "tasks.yaml"
    assert cli("export", "-o", str(exported)).returncode == 0
    assert "after" in exported.read_text()
    with ays.api() as api:
        for name in ("c", "a", "b"):
            found = api.get("/tasks", params={"name": name}).json()["items"]
            assert api.delete(f"/tasks/{[t for t in found if t['name'] == name][0]['id']}")
    applied = cli("apply", "-f", str(exported))
    assert applied.returncode == 0, applied.stdout + applied.stderr
    with ays.api() as api:
        again = [t for t in api.get("/tasks").json()["items"] if t["name"] == "c"][0]
    assert again["after"] == task["after"] and again["after_mode"] == "any"


def test_two_managers_on_one_mariadb_database_fire_each_child_slot_exactly_once(
    tmp_path: Path, mysql_url: str
) -> None:
    ports = [free_port(), free_port()]
    node_port = free_port()
    daemons = []
    for i, port in enumerate(ports):
        config = write_config(tmp_path / f"m{i}.yaml", mysql_url, port, tmp_path / f"m{i}")
        daemons.append(manager(config, tmp_path / f"m{i}.log", port).start())
    try:
        with client(ports[0]) as api:
            assert api.post("/node-groups", json={"name": "g1"}).status_code == 201
        daemons.append(node(tmp_path / "m0.yaml", tmp_path / "node.log", "g1", node_port).start())
        with client(ports[0]) as api:
            wait_for(
                lambda: api.get("/nodes", params={"status": "online"}).json()["total"] == 1,
                45,
                "the node online",
            )
            add(api, "a", schedule="* * * * * *")
            add(api, "b", schedule="* * * * * *")
            child = add(api, "c", after=[{"task": "a"}, {"task": "b"}], after_mode="all")
            any_child = add(api, "d", after=[{"task": "a"}], after_mode="any")
            wait_for(lambda: ended(api, child["id"], "succeeded", 6), 90, "six child runs")
            wait_for(lambda: ended(api, any_child["id"], "succeeded", 6), 90, "six any-runs")
        engine = create_engine(mysql_url)
        with engine.begin() as conn:
            conn.execute(update(Task).values(enabled=False))
        engine.dispose()
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
    engine = create_engine(mysql_url)
    with engine.connect() as conn:
        for task_id in (child["id"], any_child["id"]):
            rows = conn.execute(
                select(JobLog.scheduled_at, JobLog.status).where(
                    JobLog.task_id == task_id, JobLog.attempt == 0
                )
            ).all()
            counts = Counter(r.scheduled_at for r in rows)
            assert counts and max(counts.values()) == 1
    engine.dispose()


def test_a_child_gets_its_parents_results_as_json(ays: Cluster) -> None:
    seen = ays.tmp / "seen.json"
    with ays.api() as api:
        add(
            api,
            "extract",
            'printf \'{"rows": 42, "day": "%s"}\' "$AYS_PARAMS" > "$AYS_RESULT_FILE"',
        )
        add(api, "quiet", "true")
        add(api, "noisy", 'echo "not json" > "$AYS_RESULT_FILE"')
        child = add(
            api,
            "load",
            f'printf "%s" "$AYS_PARENT_RESULTS" > {seen}',
            after=[{"task": "extract"}, {"task": "quiet"}, {"task": "noisy"}],
            after_mode="any",
        )
        extract = api.get("/tasks", params={"name": "extract"}).json()["items"][0]
        trigger = api.post(f"/tasks/{extract['id']}/trigger", json={"params": "2026-12-05"})
        assert trigger.status_code == 202
        wait_for(lambda: ended(api, child["id"], "succeeded", 1), 60, "the child's run")
        parent_run = runs(api, extract["id"])[0]
        assert json.loads(parent_run["result"]) == {"rows": 42, "day": "2026-12-05"}
        # the other parents have not run this slot: null
        assert json.loads(seen.read_text()) == {
            "extract": {"rows": 42, "day": "2026-12-05"},
            "noisy": None,
            "quiet": None,
        }
        noisy = api.get("/tasks", params={"name": "noisy"}).json()["items"][0]
        assert api.post(f"/tasks/{noisy['id']}/trigger", json={}).status_code == 202
        wait_for(lambda: ended(api, noisy["id"], "succeeded", 1), 60, "the noisy run")
        bad = runs(api, noisy["id"])[0]
        assert bad["result"] is None and "result file is not JSON: not kept" in bad["message"]


# --- a parent's slot ended by its retry's skip (the manager's own result path, no node) ----


def _child_of_burst(engine: Engine) -> int:
    """A child `after` the task "burst" of tests.test_runs.claimed_runs (mode all)."""
    parent = [{"task": "burst", "condition": "success"}]
    child = add_task(engine, "child", schedule="", after=parent, after_mode="all")
    with engine.begin() as conn:
        conn.execute(
            insert(TaskEdge).values(child_id=child, parent_name="burst", condition="success")
        )
    return child


def _slot_rows(engine: Engine, task_id: int) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(JobLog.status, JobLog.message).where(JobLog.task_id == task_id)
        ).all()
    return [(r.status, r.message) for r in rows]


def test_a_lost_parent_that_succeeded_after_all_while_its_retry_is_skipped_decides_the_child(
    engine: Engine,
) -> None:
    (job,) = claimed_runs(engine, 1, retry_count=1, retry_interval_s=0)
    child = _child_of_burst(engine)

    async def scenario() -> None:
        runs = tracker(engine, [])
        await runs.dispatched(job, NODE)
        await runs.node_lost(NODE)
        assert not await runs.record_result(report(job))  # its retry is skipped
        await runs.stop()

    asyncio.run(scenario())
    assert _slot_rows(engine, child) == [("skipped", "skipped: parent burst was skipped")]


def test_a_parent_retry_skipped_because_its_task_was_disabled_decides_the_child(
    engine: Engine,
) -> None:
    (job,) = claimed_runs(engine, 1, retry_count=1, retry_interval_s=1.0)
    child = _child_of_burst(engine)

    async def scenario() -> None:
        runs = tracker(engine, [])
        await runs.dispatched(job, NODE)
        await runs.record_result(report(job, RunStatus.FAILED.value, exit_code=1))
        with engine.begin() as conn:  # while its retry waits
            conn.execute(update(Task).where(Task.id == job.task_id).values(enabled=False))
        for _ in range(400):  # bounded: the retry is due in 1 s
            if _slot_rows(engine, child):
                break
            await asyncio.sleep(0.05)
        await runs.stop()

    asyncio.run(scenario())
    assert ("skipped", "not retried: the task was disabled or deleted") in _slot_rows(
        engine, job.task_id
    )
    assert _slot_rows(engine, child) == [("skipped", "skipped: parent burst was skipped")]
