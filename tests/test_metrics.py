"""GET /metrics on a real manager and a real node: the Prometheus text format (read back with
prometheus-client's own parser), series that move as runs happen, and the access token
unless the env opens the route (`metrics.public: true`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from ays_runtime.metrics import manager as manager_metrics
from ays_runtime.metrics import node as node_metrics
from ays_runtime.metrics.manager import ManagerState
from ays_runtime.metrics.node import NodeState
from tests.daemons import CLUSTER_SECRET, TOKEN, Cluster, cluster, wait_for
from tests.test_end_to_end import add_task

ROOT = Path(__file__).resolve().parent.parent

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int, token: str | None = TOKEN) -> Samples:
    """Every sample of `/metrics` on 127.0.0.1:`port`, parsed by prometheus-client."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def has(samples: Samples, name: str) -> bool:
    return any(n == name for n, _ in samples)


def finished(ays: Cluster, task: int, status: str) -> int:
    with ays.api() as api:
        page = api.get("/job-logs", params={"task_id": task, "status": status, "limit": 1}).json()
    return int(page["total"])


@pytest.mark.slow
def test_the_metrics_of_a_manager_and_its_node_move_as_runs_happen(tmp_path: Path) -> None:
    with cluster(tmp_path, Cluster) as ays:
        assert ays.node is not None
        ok = add_task(ays, "echo fine", schedule="* * * * * *")  # every second
        bad = add_task(ays, "exit 3", schedule="* * * * * *")
        wait_for(lambda: finished(ays, ok, "succeeded") >= 2, 90, "two runs that succeeded")
        wait_for(lambda: finished(ays, bad, "failed") >= 1, 90, "a run that failed")

        def counted() -> Samples | None:  # the metrics thread counts stored runs a moment later
            samples = scrape(ays.manager_port)
            done = value(samples, "ays_run_duration_seconds_count", node_group="g1") >= 3
            return samples if done else None

        first = wait_for(counted, 30, "the finished runs counted")
        assert value(first, "ays_fires_claimed_total", trigger="cron") >= 3
        assert value(first, "ays_runs_finished_total", node_group="g1", status="succeeded") >= 2
        assert value(first, "ays_runs_finished_total", node_group="g1", status="failed") >= 1
        assert value(first, "ays_run_duration_seconds_count", node_group="g1") >= 3
        for stage in ("claimed", "dispatched", "stored", "started"):
            assert value(first, "ays_fire_lateness_seconds_count", stage=stage) >= 1, stage
        assert value(first, "ays_nodes", node_group="g1", status="online") == 1
        assert value(first, "ays_tasks", enabled="true") == 2
        assert value(first, "ays_timers") == 2
        assert value(first, "ays_reconcile_duration_seconds_count") >= 1
        assert value(first, "ays_reconcile_actions_total", action="add") >= 2
        assert value(first, "ays_build_info") == 1
        for status in ("pending", "dispatched", "running"):
            assert (("ays_runs_unfinished", frozenset({("status", status)}))) in first
        assert ("ays_fire_backlog", frozenset()) in first
        assert ("ays_purged_rows_total", frozenset({("table", "ays_job_log")})) in first
        assert value(first, "ays_transport_errors_total", transport="builtin") == 0
        # No task id on the run series unless the env asks for it.
        assert value(first, "ays_task_runs_finished_total") == 0

        on_node = scrape(ays.node_port, CLUSTER_SECRET)
        assert value(on_node, "ays_node_info", node_group="g1") == 1
        assert value(on_node, "ays_node_runs_finished_total", status="succeeded") >= 2
        assert value(on_node, "ays_node_runs_finished_total", status="failed") >= 1
        assert value(on_node, "ays_node_result_deliveries_total", outcome="delivered") >= 3
        assert value(on_node, "ays_node_slots") == 8  # node.max_concurrent_jobs' default
        free = value(on_node, "ays_node_slots_free")
        busy = value(on_node, "ays_node_jobs_running") + value(on_node, "ays_node_jobs_waiting")
        assert free + busy == 8
        for name in ("ays_node_spooled_results", "ays_node_result_retries_total"):
            assert has(on_node, name), name

        # The counters go on counting: later scrapes see more runs, on both sides.
        def moved() -> bool:
            later, node_later = scrape(ays.manager_port), scrape(ays.node_port, CLUSTER_SECRET)
            name, node_name = "ays_runs_finished_total", "ays_node_runs_finished_total"
            return (
                value(later, name) > value(first, name)
                and value(later, "ays_fires_claimed_total")
                > value(first, "ays_fires_claimed_total")
                and value(node_later, node_name) > value(on_node, node_name)
            )

        wait_for(moved, 60, "the run counters to move")


@pytest.mark.slow
def test_metrics_need_the_access_token_unless_the_env_opens_them(tmp_path: Path) -> None:
    with cluster(tmp_path, Cluster) as ays:
        for port in (ays.manager_port, ays.node_port):
            answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
            assert answer.status_code == 401, answer.text
            assert answer.headers["www-authenticate"] == "Bearer"
            wrong = httpx.get(
                f"http://127.0.0.1:{port}/metrics",
                headers={"Authorization": "Bearer not-the-token"},
                timeout=30,
            )
            assert wrong.status_code == 401
        assert scrape(ays.manager_port)  # with the token: the metrics
        # A node takes only the cluster secret (which the manager takes for /metrics too).
        assert (
            httpx.get(
                f"http://127.0.0.1:{ays.node_port}/metrics",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=30,
            ).status_code
            == 401
        )
        assert scrape(ays.node_port, CLUSTER_SECRET)
        assert scrape(ays.manager_port, CLUSTER_SECRET)


@pytest.mark.slow
def test_open_metrics_need_no_token_and_count_per_task_when_asked(tmp_path: Path) -> None:
    opened = {"public": True, "task_labels": True}
    with cluster(tmp_path, Cluster, metrics=opened) as ays:
        task = add_task(ays, "echo once")
        with ays.api() as api:
            assert api.post(f"/tasks/{task}/trigger", json={}).status_code == 202
        wait_for(lambda: finished(ays, task, "succeeded") == 1, 60, "the run to succeed")

        def counted() -> Samples | None:  # no token: the env opened the route
            samples = scrape(ays.manager_port, token=None)
            return samples if value(samples, "ays_task_runs_finished_total") == 1 else None

        samples = wait_for(counted, 30, "the run counted")
        assert value(samples, "ays_fires_claimed_total", trigger="manual") == 1
        assert (
            value(samples, "ays_task_runs_finished_total", task_id=str(task), status="succeeded")
            == 1
        )
        assert value(samples, "ays_task_run_duration_seconds_count", task_id=str(task)) == 1
        assert value(scrape(ays.node_port, token=None), "ays_node_runs_finished_total") == 1
        # Only /metrics is opened: the rest of both APIs still needs the token.
        for url in (
            f"http://127.0.0.1:{ays.manager_port}/api/v1/tasks",
            f"http://127.0.0.1:{ays.node_port}/api/v1/jobs/1/output",
        ):
            assert httpx.get(url, timeout=30).status_code == 401, url


@pytest.mark.slow
def test_the_readme_and_the_dashboard_name_only_series_that_exist(engine: Engine) -> None:
    """Every series the README lists and the Grafana dashboard queries is one the manager or
    the node exports, and every one they export is listed (on SQLite and MySQL alike: the
    scrape-time counts run on both)."""
    manager_metrics.attach(ManagerState(engine, lambda: 0, lambda: 0), transport="builtin")
    node_metrics.attach(NodeState("g1", lambda: 0, lambda: 0, lambda: 4, lambda: 0))
    families: set[str] = set()
    for registry in (manager_metrics.REGISTRY, node_metrics.REGISTRY):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            suffix = "_total" if family.type == "counter" else ""
            families.add(family.name + suffix)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(ays_[a-z_]+)[`{]", section))
    assert listed == families
    dashboard = json.loads((ROOT / "docs" / "grafana" / "ays.json").read_text(encoding="utf-8"))
    queried = {
        re.sub(r"_(bucket|count|sum)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bays_[a-z_]+", target["expr"])
    }
    assert queried <= families, queried - families
