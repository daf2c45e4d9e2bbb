"""Workflows (issue 18) on a real manager and node: a start by hand runs every task of it
with one slot and its params, its status follows its tasks' runs, a failed run is rerun
from its failed task on, a run past its timeout ends failed, a schedule starts it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.daemons import BIN, TOKEN, Cluster, cluster, wait_for
from tests.test_dependencies import add, runs

if TYPE_CHECKING:
    from playwright.sync_api import Page


@pytest.fixture
def ays(tmp_path: Path) -> Any:
    with cluster(tmp_path, Cluster) as running:
        yield running


def cli(ays: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "aysManager", *args, "--url", f"http://127.0.0.1:{ays.manager_port}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"AYS_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"},
    )


def settled(api: httpx.Client, run_id: int) -> dict[str, Any] | None:
    run = dict(api.get(f"/workflow-runs/{run_id}").json())
    return None if run["status"] == "running" else run


def test_a_workflow_started_by_hand_runs_every_task_once_with_its_slot_and_params(
    ays: Cluster,
) -> None:
    log = ays.tmp / "ran.txt"
    step = f'echo "$AYS_TASK_ID $AYS_PARAMS $AYS_SCHEDULED_AT" >> {log}'
    with ays.api() as api:
        tasks = [
            add(api, "extract", step),
            add(api, "clean", step, after=[{"task": "extract"}]),
            add(api, "enrich", step, after=[{"task": "extract"}]),
            add(api, "load", step, after=[{"task": "clean"}, {"task": "enrich"}]),
        ]
        made = api.post(
            "/workflows",
            json={"name": "etl", "tasks": [t["name"] for t in tasks], "params": "default"},
        )
        assert made.status_code == 201, made.text
    started = cli(ays, "workflow", "start", "etl", "--params", "day=2026-12-05", "--wait")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "succeeded" in started.stdout
    with ays.api() as api:
        view = api.get("/workflows/etl").json()
        latest = view["latest_run"]
        assert latest["status"] == "succeeded" and latest["params"] == "day=2026-12-05"
        assert [(n["task"], n["depth"]) for n in latest["nodes"]] == [
            ("extract", 0),
            ("clean", 1),
            ("enrich", 1),
            ("load", 2),
        ]
        assert {n["status"] for n in latest["nodes"]} == {"succeeded"}
        assert all(n["node"] == f"127.0.0.1:{ays.node_port}" for n in latest["nodes"])
        slots = {r["scheduled_at"] for t in tasks for r in runs(api, t["id"])}
        assert slots == {latest["scheduled_at"]}
    lines = log.read_text().splitlines()
    assert len(lines) == 4 and {line.split()[1] for line in lines} == {"day=2026-12-05"}
    with ays.api() as api:
        trail = api.get("/audit", params={"target_type": "workflow"}).json()["items"]
        assert {e["action"] for e in trail} == {"workflow.created", "workflow.started"}
    shown = cli(ays, "workflow", "show", "etl")
    assert shown.returncode == 0, shown.stderr
    assert "load" in shown.stdout and "clean, enrich" in shown.stdout
    listed = cli(ays, "workflow", "list")
    assert "etl" in listed.stdout and "succeeded" in listed.stdout


def test_a_failed_workflow_is_rerun_from_the_failed_task_on(ays: Cluster) -> None:
    marker = ays.tmp / "fixed"
    with ays.api() as api:
        first = add(api, "first")
        flaky = add(api, "flaky", f"test -e {marker}", after=[{"task": "first"}])
        last = add(api, "last", after=[{"task": "flaky"}])
        assert api.post(
            "/workflows", json={"name": "w", "tasks": ["first", "flaky", "last"]}
        ).is_success
        run = api.post("/workflows/w/start", json={}).json()
        failed = wait_for(lambda: settled(api, run["id"]), 60, "the run's end")
        assert failed["status"] == "failed"
        states = {n["task"]: n["status"] for n in failed["nodes"]}
        assert states == {"first": "succeeded", "flaky": "failed", "last": "skipped"}
        refused = api.post(f"/workflow-runs/{run['id'] + 1000}/rerun")
        assert refused.status_code == 404
    marker.touch()
    rerun = cli(ays, "workflow", "rerun", str(run["id"]))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "rerun from flaky" in rerun.stdout
    with ays.api() as api:
        done = wait_for(lambda: settled(api, run["id"]), 60, "the rerun's end")
        assert done["status"] == "succeeded"
        assert [r["attempt"] for r in runs(api, first["id"])] == [0]  # not run again
        assert sorted((r["attempt"], r["status"]) for r in runs(api, flaky["id"])) == [
            (0, "failed"),
            (1, "succeeded"),
        ]
        assert sorted((r["attempt"], r["status"]) for r in runs(api, last["id"])) == [
            (0, "skipped"),
            (1, "succeeded"),
        ]
        again = api.post(f"/workflow-runs/{run['id']}/rerun")
        assert again.status_code == 409 and "only a failed run" in again.text


def test_a_workflow_past_its_timeout_ends_failed_with_its_runs_killed(ays: Cluster) -> None:
    with ays.api() as api:
        slow = add(api, "slow", "sleep 60")
        add(api, "after_slow", after=[{"task": "slow"}])
        assert api.post(
            "/workflows", json={"name": "w", "tasks": ["slow", "after_slow"], "timeout_s": 2}
        ).is_success
        run = api.post("/workflows/w/start", json={}).json()
        ended = wait_for(lambda: settled(api, run["id"]), 60, "the timeout")
        assert ended["status"] == "failed" and ended["message"] == "timed out after 2s"
        killed = wait_for(
            lambda: [r for r in runs(api, slow["id"]) if r["status"] == "killed"], 60, "the kill"
        )
        assert "timed out" in killed[0]["message"]


def test_a_scheduled_workflow_starts_each_slot_once_and_partly_skipped_says_so(
    ays: Cluster,
) -> None:
    with ays.api() as api:
        add(api, "ok")
        add(api, "on_failure", after=[{"task": "ok", "condition": "failure"}])
        made = api.post(
            "/workflows",
            json={"name": "tick", "tasks": ["ok", "on_failure"], "schedule": "*/2 * * * * *"},
        )
        assert made.status_code == 201, made.text

        def two_settled() -> list[dict[str, Any]]:
            found = [r for r in api.get("/workflows/tick").json()["runs"]]
            done = [r for r in found if r["status"] != "running"]
            return done if len(done) >= 2 else []

        done = wait_for(two_settled, 60, "two scheduled runs")
        assert {r["status"] for r in done} == {"partly_skipped"}
        assert {r["trigger"] for r in done} == {"cron"}
        assert len({r["scheduled_at"] for r in done}) == len(done)
        assert api.patch("/workflows/tick", json={"enabled": False}).is_success
        bad = api.post("/workflows", json={"name": "x", "tasks": ["nope"]})
        assert bad.status_code == 422 and "nope" in bad.text
        taken = api.post("/workflows", json={"name": "y", "tasks": ["ok"]})
        assert taken.status_code == 422 and "tick" in taken.text


@pytest.mark.slow
def test_the_console_draws_the_workflow_and_each_tasks_state_in_its_latest_run(
    ays: Cluster, shot: Callable[[Page, str], None]
) -> None:
    from playwright.sync_api import expect, sync_playwright

    from tests.test_console_browser import CHROMIUM, WIDE, Recorder

    with ays.api() as api:
        add(api, "extract")
        add(api, "check", "exit 4", after=[{"task": "extract"}])
        add(api, "load", after=[{"task": "check"}])
        assert api.post(
            "/workflows", json={"name": "etl", "tasks": ["extract", "check", "load"]}
        ).is_success
    base = f"http://127.0.0.1:{ays.manager_port}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), chromium_sandbox=False, args=["--no-sandbox"]
        )
        try:
            context = browser.new_context(viewport=WIDE, base_url=base)
            context.set_default_timeout(30_000)
            page = context.new_page()
            requests = Recorder(page)
            page.goto("/workflows")
            page.get_by_label("Access token").fill(TOKEN)
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_role("link", name="etl")).to_be_visible()
            page.get_by_role("link", name="etl").click()
            expect(page.locator("#wf-graph")).to_contain_text("Never run")
            page.get_by_label("Params").fill("day=1")
            page.get_by_role("button", name="Start now").click()
            # htmx refreshes the graph while the run goes on, until it ends.
            expect(page.locator("[data-run-status]")).to_have_attribute(
                "data-run-status", "failed", timeout=60_000
            )
            states = {
                task: page.locator(f'g.wf-node[data-task="{task}"]').get_attribute("data-status")
                for task in ("extract", "check", "load")
            }
            assert states == {"extract": "succeeded", "check": "failed", "load": "skipped"}
            expect(page.locator('g.wf-node[data-task="extract"]')).to_contain_text(
                f"127.0.0.1:{ays.node_port}"
            )
            assert page.locator("line.wf-edge").count() == 2
            shot(page, "workflow")
            expect(page.get_by_role("button", name="Rerun from the failed tasks")).to_be_visible()
            assert requests.external() == []
        finally:
            browser.close()
