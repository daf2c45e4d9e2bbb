"""`aysManager apply` and `export` (tasks as code) as an operator runs them: the installed entry
point as a subprocess, against a real manager (one for the module, SQLite; no node is needed to
plan or apply). Each test names its own node groups and tasks."""

from __future__ import annotations

import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.daemons import cluster
from tests.test_cli import Ays


@pytest.fixture(scope="module")
def ays(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ays]:
    with cluster(tmp_path_factory.mktemp("apply"), Ays, with_node=False) as running:
        yield running


def tasks_file(tmp: Path, text: str) -> Path:
    path = tmp / f"tasks-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def names() -> tuple[str, str]:
    """A node group and a task prefix of one test's own."""
    tag = uuid.uuid4().hex[:6]
    return f"g_{tag}", f"t-{tag}"


def document(group: str, prefix: str, schedule: str = "0 30 2 * * *") -> str:
    return f"""\
node_groups:
  - name: {group}
    description: reports
tasks:
  - name: {prefix}-report
    node_group: {group}
    schedule: "{schedule}"
    timezone: Asia/Riyadh
    payload:
      command: |
        cd /opt/report
        ./run.sh --full
    timeout_s: 600
    retry_count: 2
  - name: {prefix}-ping
    node_group: {group}
    schedule: "@every 30s"
    task_type: http
    payload: {{url: "https://example.com/ping", method: POST}}
    enabled: false
"""


def task_state(ays: Ays, name: str) -> dict[str, object]:
    return dict(next(t for t in ays.json("task", "list", "--name", name) if t["name"] == name))


def test_apply_creates_the_files_groups_and_tasks_and_a_second_apply_changes_nothing(
    ays: Ays,
) -> None:
    group, prefix = names()
    path = tasks_file(ays.tmp, document(group, prefix))

    out = ays.ok("apply", "-f", str(path))
    assert out.splitlines() == [
        f"create node group {group}",
        f"create task {prefix}-report",
        f"create task {prefix}-ping",
        *[line for line in out.splitlines() if line.startswith("not in ")],
        "applied: 3 created, 0 unchanged",
    ]
    report = task_state(ays, f"{prefix}-report")
    assert (report["schedule"], report["retry_count"]) == ("0 30 2 * * *", 2)
    assert report["payload"] == {"command": "cd /opt/report\n./run.sh --full\n", "env": {}}
    assert task_state(ays, f"{prefix}-ping")["enabled"] is False

    again = ays.ok("apply", "-f", str(path))
    assert again.splitlines()[-1] == "no change: 3 unchanged"
    assert task_state(ays, f"{prefix}-report")["version"] == 1


def test_apply_updates_field_by_field_and_a_dry_run_changes_nothing(ays: Ays) -> None:
    group, prefix = names()
    ays.ok("apply", "-f", str(tasks_file(ays.tmp, document(group, prefix))))
    changed = document(group, prefix, schedule="0 0 3 * * *").replace("    retry_count: 2\n", "")
    path = tasks_file(ays.tmp, changed)

    planned = ays.ok("apply", "-f", str(path), "--dry-run")
    assert f"update task {prefix}-report" in planned
    assert "    schedule: '0 30 2 * * *' -> '0 0 3 * * *'" in planned
    assert "    retry_count: 2 -> 0" in planned
    assert planned.splitlines()[-1] == "dry run: 1 to update, 2 unchanged; nothing was changed"
    assert task_state(ays, f"{prefix}-report")["schedule"] == "0 30 2 * * *"

    applied = ays.ok("apply", "-f", str(path))
    assert applied.splitlines()[-1] == "applied: 1 updated, 2 unchanged"
    report = task_state(ays, f"{prefix}-report")
    assert (report["schedule"], report["retry_count"], report["version"]) == ("0 0 3 * * *", 0, 2)
    history = ays.json("task", "history", f"{prefix}-report")
    assert [(h["version"], h["via"]) for h in history] == [(2, "apply"), (1, "apply")]


def test_prune_deletes_what_the_file_does_not_name_and_only_with_prune(ays: Ays) -> None:
    group, prefix = names()
    ays.ok("apply", "-f", str(tasks_file(ays.tmp, document(group, prefix))))
    everything = yaml.safe_load(ays.ok("export"))
    everything["tasks"] = [t for t in everything["tasks"] if t["name"] != f"{prefix}-ping"]
    path = tasks_file(ays.tmp, yaml.safe_dump(everything))

    kept = ays.ok("apply", "-f", str(path))
    assert f"not in {path}, kept (--prune deletes them): task {prefix}-ping" in kept
    assert task_state(ays, f"{prefix}-ping")

    pruned = ays.ok("apply", "-f", str(path), "--prune")
    assert f"delete task {prefix}-ping" in pruned
    assert pruned.splitlines()[-1].startswith("applied: 1 deleted, ")
    assert ays.json("task", "list", "--name", f"{prefix}-ping") == []


def test_an_export_comes_back_through_apply_unchanged(ays: Ays) -> None:
    group, prefix = names()
    ays.ok("apply", "-f", str(tasks_file(ays.tmp, document(group, prefix))))
    ays.ok("task", "edit", f"{prefix}-report", "--job-env", "MODE=quick", "--params", "2026-01-01")

    exported = ays.ok("export")
    assert exported.startswith("# Ays tasks as code")
    assert "      cd /opt/report\n      ./run.sh --full\n" in exported  # a literal block
    round_trip = ays.run("apply", "-f", "-", "--dry-run", "--prune", stdin=exported)
    assert round_trip.returncode == 0, round_trip.stderr
    assert round_trip.stdout.splitlines()[-1].startswith("no change: ")

    only = yaml.safe_load(ays.ok("export", "--task", f"{prefix}-ping"))
    assert [g["name"] for g in only["node_groups"]] == [group]
    assert only["tasks"] == [
        {
            "name": f"{prefix}-ping",
            "node_group": group,
            "schedule": "@every 30s",
            "task_type": "http",
            "payload": {"url": "https://example.com/ping", "method": "POST"},
            "enabled": False,
        }
    ]
    by_group = yaml.safe_load(ays.ok("export", "-g", group))
    assert {t["name"] for t in by_group["tasks"]} == {f"{prefix}-report", f"{prefix}-ping"}
    assert by_group["tasks"][1]["params"] == "2026-01-01"  # text, not a date

    target = ays.tmp / f"export-{prefix}.yaml"
    assert "2 task(s), 1 node group(s)" in ays.ok("export", "-g", group, "-o", str(target))
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert yaml.safe_load(target.read_text()) == by_group


# A valid new group and task first (lines 1-7): they are not applied either.
GOOD = (
    "node_groups:\n  - name: {group}_new\n"
    "tasks:\n  - name: {prefix}-new\n    node_group: {group}\n    schedule: '@daily'\n"
    "    payload: {{command: x}}\n"
)
BAD_FILES = {
    "a YAML error": (
        "  - name: x\n    schedule: [\n",
        "{file}:10:1: not valid YAML: expected the node content, but found '<stream end>'",
    ),
    "an unknown field": (
        "  - name: bad-colour\n    node_group: {group}\n    schedule: '@daily'\n"
        "    colour: red\n    payload: {{command: x}}\n",
        "{file}:11: task 'bad-colour': colour: 'red' is not valid: not a known field;",
    ),
    "a bad cron": (
        "  - name: bad-cron\n    node_group: {group}\n    schedule: '0 61 * * * *'\n"
        "    payload: {{command: x}}\n",
        "{file}:10: task 'bad-cron': schedule: '0 61 * * * *' is not valid: a valid cron",
    ),
    "an unknown group": (
        "  - name: lost\n    node_group: mars\n    schedule: '@daily'\n"
        "    payload: {{command: x}}\n",
        "{file}:9: task 'lost': node_group: 'mars' is not valid: a node group of the manager",
    ),
    "a key twice": (
        "  - name: twice\n    schedule: '@daily'\n    schedule: '@hourly'\n",
        "{file}:10: 'schedule' appears twice in this mapping",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_is_refused_at_its_line_with_the_task_and_field_and_nothing_is_applied(
    ays: Ays, case: str
) -> None:
    group, prefix = names()
    ays.ok("apply", "-f", str(tasks_file(ays.tmp, document(group, prefix))))
    before = ays.ok("export")
    bad, expected = BAD_FILES[case]
    path = tasks_file(ays.tmp, (GOOD + bad).format(group=group, prefix=prefix))

    done = ays.run("apply", "-f", str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(expected.format(file=path)), done.stderr
    assert "Traceback" not in done.stderr
    assert ays.ok("export") == before


def test_a_workflow_in_the_file_is_applied_exported_and_pruned_only_with_prune(ays: Ays) -> None:
    group, prefix = names()
    flow = f"w-{prefix}"
    text = document(group, prefix) + (
        f"workflows:\n  - name: {flow}\n    tasks: [{prefix}-report, {prefix}-ping]\n"
        "    params: quick\n"
    )
    created = ays.ok("apply", "-f", str(tasks_file(ays.tmp, text)))
    assert f"create workflow {flow}" in created

    exported = yaml.safe_load(ays.ok("export", "--group", group))
    assert exported["workflows"] == [
        {"name": flow, "tasks": sorted([f"{prefix}-ping", f"{prefix}-report"]), "params": "quick"}
    ]
    round_trip = ays.run("apply", "-f", "-", "--dry-run", stdin=yaml.safe_dump(exported))
    assert round_trip.returncode == 0, round_trip.stderr
    assert round_trip.stdout.splitlines()[-1].startswith("no change: ")

    bad = text.replace("params: quick", "params: quick\n    timeout_s: -1")
    refused = ays.run("apply", "-f", str(tasks_file(ays.tmp, bad)))
    assert refused.returncode != 0
    assert f"workflow '{flow}': timeout_s" in refused.stderr

    everything = yaml.safe_load(ays.ok("export"))  # the other tests' tasks stay
    everything["workflows"] = [w for w in everything["workflows"] if w["name"] != flow]
    without = tasks_file(ays.tmp, yaml.safe_dump(everything))
    assert f"workflow {flow}" in ays.ok("apply", "-f", str(without))  # kept
    pruned = ays.ok("apply", "-f", str(without), "--prune")
    assert f"delete workflow {flow}" in pruned
