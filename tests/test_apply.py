"""Tasks as code through the API: POST /apply (plan, dry run, prune, one transaction) and
GET /export (what apply takes back unchanged). Real HTTP (the API of test_manager_api), on
SQLite and MySQL/MariaDB."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import NodeGroup
from tests.test_manager_api import Api, served_api

DOCUMENT: dict[str, Any] = {
    "node_groups": [{"name": "ksa", "description": "KSA executors"}, {"name": "uae"}],
    "tasks": [
        {
            "name": "nightly-report",
            "node_group": "ksa",
            "schedule": "0 30 2 * * *",
            "timezone": "Asia/Riyadh",
            "payload": {"command": "/opt/report/run.sh", "env": {"MODE": "full"}},
            "timeout_s": 600,
            "retry_count": 2,
        },
        {
            "name": "ping-billing",
            "node_group": "uae",
            "schedule": "@every 30s",
            "task_type": "http",
            "payload": {"url": "https://billing.example.com/ping", "method": "post"},
            "enabled": False,
        },
    ],
}


@pytest.fixture
def api(sessions: sessionmaker[Session]) -> Iterator[Api]:
    with served_api(sessions) as served:
        yield served


def apply(api: Api, document: dict[str, Any], **params: bool) -> dict[str, Any]:
    response = api.client.post("/apply", json=document, params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def actions(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(s["kind"], s["name"], s["action"]) for s in result["steps"]]


def task_named(api: Api, name: str) -> dict[str, Any]:
    items = api.client.get("/tasks", params={"name": name}).json()["items"]
    return next(t for t in items if t["name"] == name)


def test_applying_a_document_creates_its_groups_and_tasks_and_a_second_time_changes_nothing(
    api: Api,
) -> None:
    first = apply(api, DOCUMENT)
    assert first["applied"] is True
    assert actions(first) == [
        ("node_group", "ksa", "create"),
        ("node_group", "uae", "create"),
        ("task", "nightly-report", "create"),
        ("task", "ping-billing", "create"),
    ]
    assert (first["created"], first["updated"], first["unchanged"]) == (4, 0, 0)
    assert api.hooks.changed == 1  # one reconcile for the whole document
    report = task_named(api, "nightly-report")
    assert (report["timezone"], report["retry_count"], report["version"]) == ("Asia/Riyadh", 2, 1)
    billing = task_named(api, "ping-billing")
    assert (billing["enabled"], billing["payload"]["method"]) == (False, "POST")
    history = api.client.get(f"/tasks/{report['id']}/versions").json()["items"]
    assert [(r["via"], r["change"]) for r in history] == [("apply", "created")]

    second = apply(api, DOCUMENT)
    assert second["applied"] is False
    assert {s["action"] for s in second["steps"]} == {"unchanged"}
    assert second["unchanged"] == 4
    assert api.hooks.changed == 1
    assert task_named(api, "nightly-report")["version"] == 1


def test_an_update_is_planned_field_by_field_and_a_field_left_out_goes_back_to_its_default(
    api: Api,
) -> None:
    apply(api, DOCUMENT)
    changed = copy.deepcopy(DOCUMENT)
    changed["node_groups"][1]["description"] = "UAE executors"
    report = changed["tasks"][0]
    report["schedule"] = "0 0 3 * * *"
    report["payload"]["env"] = {"MODE": "quick", "DEBUG": "1"}
    del report["retry_count"]  # back to the default, 0

    result = apply(api, changed, dry_run=True)
    assert result["applied"] is False
    steps = {(s["kind"], s["name"]): s for s in result["steps"]}
    assert steps[("node_group", "uae")]["changes"] == [
        {"field": "description", "old": "", "new": "UAE executors"}
    ]
    assert steps[("task", "nightly-report")]["changes"] == [
        {"field": "schedule", "old": "0 30 2 * * *", "new": "0 0 3 * * *"},
        {"field": "payload.env.MODE", "old": "full", "new": "quick"},
        {"field": "payload.env.DEBUG", "old": None, "new": "1"},
        {"field": "retry_count", "old": 2, "new": 0},
    ]
    assert steps[("task", "ping-billing")]["action"] == "unchanged"
    assert task_named(api, "nightly-report")["schedule"] == "0 30 2 * * *"  # a dry run

    result = apply(api, changed, dry_run=False)
    assert (result["applied"], result["updated"]) == (True, 2)
    task = task_named(api, "nightly-report")
    assert (task["schedule"], task["retry_count"], task["version"]) == ("0 0 3 * * *", 0, 2)
    history = api.client.get(f"/tasks/{task['id']}/versions", headers={}).json()["items"]
    assert (history[0]["via"], history[0]["changed_fields"]) == (
        "apply",
        ["schedule", "payload", "retry_count"],
    )


def test_what_the_document_does_not_name_is_kept_unless_pruned(api: Api) -> None:
    apply(api, DOCUMENT)
    api.client.post("/node-groups", json={"name": "spare"})
    smaller = {"node_groups": [DOCUMENT["node_groups"][0]], "tasks": [DOCUMENT["tasks"][0]]}

    kept = apply(api, smaller)
    assert kept["applied"] is False
    assert (kept["kept_tasks"], kept["kept_node_groups"]) == (["ping-billing"], ["spare", "uae"])

    pruned = apply(api, smaller, prune=True)
    assert pruned["applied"] is True
    assert actions(pruned)[-3:] == [
        ("task", "ping-billing", "delete"),
        ("node_group", "spare", "delete"),
        ("node_group", "uae", "delete"),
    ]
    assert [t["name"] for t in api.client.get("/tasks").json()["items"]] == ["nightly-report"]
    groups = api.client.get("/node-groups").json()["items"]
    assert [g["name"] for g in groups] == ["ksa"]
    deleted = api.client.get("/task-versions", params={"name": "ping-billing"}).json()["items"]
    assert (deleted[0]["change"], deleted[0]["via"]) == ("deleted", "apply")


def test_a_group_a_task_of_the_document_runs_in_is_not_pruned_though_not_listed(
    api: Api,
) -> None:
    apply(api, DOCUMENT)
    only_task = {"tasks": [DOCUMENT["tasks"][0]]}
    result = apply(api, only_task, prune=True)
    assert ("node_group", "ksa", "delete") not in actions(result)
    assert ("node_group", "uae", "delete") in actions(result)


def test_a_bad_document_is_refused_with_every_bad_field_and_nothing_is_applied(
    api: Api,
) -> None:
    bad = copy.deepcopy(DOCUMENT)
    bad["tasks"][0]["schedule"] = "0 61 * * * *"
    bad["tasks"][1]["colour"] = "red"
    bad["tasks"].append(
        {
            "name": "orphan",
            "node_group": "nowhere",
            "schedule": "@daily",
            "payload": {"command": "x"},
        }
    )
    bad["tasks"].append(dict(DOCUMENT["tasks"][0]))  # its name a second time
    bad["tasks"].append(
        {"name": "no-command", "node_group": "ksa", "schedule": "@daily", "payload": {}}
    )

    response = api.client.post("/apply", json=bad)
    assert response.status_code == 422
    errors = {e["field"]: e for e in response.json()["errors"]}
    assert set(errors) == {
        "tasks[0].schedule",
        "tasks[1].colour",
        "tasks[2].node_group",
        "tasks[3].name",
        "tasks[4].payload.command",
    }
    assert errors["tasks[0].schedule"]["value"] == "0 61 * * * *"
    assert "the fields are" in errors["tasks[1].colour"]["error"]
    assert "ksa, uae" in errors["tasks[2].node_group"]["error"]
    assert "tasks[0] has it too" in errors["tasks[3].name"]["error"]
    assert api.client.get("/node-groups").json()["total"] == 0  # not even the valid groups
    assert api.client.get("/tasks").json()["total"] == 0
    assert api.hooks.changed == 0

    unknown = api.client.post("/apply", json={"tasks": [], "jobs": []})
    assert (unknown.status_code, unknown.json()["field"]) == (422, "jobs")


def test_an_export_comes_back_through_apply_unchanged(api: Api) -> None:
    apply(api, DOCUMENT)
    api.client.post(f"/tasks/{task_named(api, 'nightly-report')['id']}/disable")

    exported = api.client.get("/export").json()
    assert exported["node_groups"] == [
        {"name": "ksa", "description": "KSA executors"},
        {"name": "uae"},
    ]
    report = exported["tasks"][0]
    assert report == {  # the fields that differ from their defaults, nothing else
        "name": "nightly-report",
        "node_group": "ksa",
        "schedule": "0 30 2 * * *",
        "timezone": "Asia/Riyadh",
        "payload": {"command": "/opt/report/run.sh", "env": {"MODE": "full"}},
        "timeout_s": 600,
        "retry_count": 2,
        "enabled": False,
    }
    assert exported["tasks"][1]["payload"] == {
        "url": "https://billing.example.com/ping",
        "method": "POST",
    }

    result = apply(api, exported, dry_run=True, prune=True)
    assert {s["action"] for s in result["steps"]} == {"unchanged"}


def test_tags_go_through_apply_and_export_and_come_back_unchanged(api: Api) -> None:
    tagged = copy.deepcopy(DOCUMENT)
    tagged["tasks"][0]["tags"] = ["nightly", "billing", "nightly"]
    apply(api, tagged)
    assert task_named(api, "nightly-report")["tags"] == ["billing", "nightly"]

    exported = api.client.get("/export").json()
    assert exported["tasks"][0]["tags"] == ["billing", "nightly"]
    assert "tags" not in exported["tasks"][1]  # written only when the task has some
    assert {s["action"] for s in apply(api, exported, dry_run=True)["steps"]} == {"unchanged"}
    assert {s["action"] for s in apply(api, tagged, dry_run=True)["steps"]} == {"unchanged"}

    tagged["tasks"][0]["tags"] = ["ops"]
    result = apply(api, tagged)
    steps = {(s["kind"], s["name"]): s for s in result["steps"]}
    assert steps[("task", "nightly-report")]["changes"] == [
        {"field": "tags", "old": ["billing", "nightly"], "new": ["ops"]}
    ]
    del tagged["tasks"][0]["tags"]  # left out: back to none
    apply(api, tagged)
    assert task_named(api, "nightly-report")["tags"] == []

    tagged["tasks"][1]["tags"] = ["Ops"]
    response = api.client.post("/apply", json=tagged)
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["tasks[1].tags.0"]


def test_an_export_can_be_limited_to_tasks_or_groups(api: Api) -> None:
    apply(api, DOCUMENT)
    report = task_named(api, "nightly-report")
    by_task = api.client.get("/export", params={"task_id": report["id"]}).json()
    assert [g["name"] for g in by_task["node_groups"]] == ["ksa"]
    assert [t["name"] for t in by_task["tasks"]] == ["nightly-report"]
    by_group = api.client.get("/export", params={"node_group": "uae"}).json()
    assert [t["name"] for t in by_group["tasks"]] == ["ping-billing"]
    missing = api.client.get("/export", params={"node_group": "mars"})
    assert (missing.status_code, missing.json()["error"]) == (
        404,
        "node group mars does not exist",
    )
    assert api.client.get("/export", params={"task_id": 999}).status_code == 404


def test_reconcile_on_request_is_refused_by_a_manager_that_cannot(api: Api) -> None:
    response = api.client.post("/reconcile")
    assert response.status_code == 503


def test_a_group_its_nodes_created_is_not_pruned(api: Api) -> None:
    apply(api, DOCUMENT)
    with api.sessions() as session, session.begin():
        session.add(
            NodeGroup(
                name="joined_by_a_node",
                description="created when node 10.0.0.5:18181 joined it",
                auto_created=True,
                created_at=utcnow(),
                updated_at=utcnow(),
            )
        )

    pruned = apply(api, DOCUMENT, prune=True)

    assert ("node_group", "joined_by_a_node", "delete") not in actions(pruned)
    names = [g["name"] for g in api.client.get("/node-groups").json()["items"]]
    assert "joined_by_a_node" in names


def flows_document() -> dict[str, Any]:
    """DOCUMENT with a chain (report -> billing) and a workflow of the two."""
    doc = copy.deepcopy(DOCUMENT)
    doc["tasks"][1]["after"] = [{"task": "nightly-report"}]
    doc["workflows"] = [
        {
            "name": "nightly",
            "description": "report then billing",
            "tasks": ["ping-billing", "nightly-report"],
            "schedule": "0 0 3 * * *",
            "timezone": "Asia/Riyadh",
            "params": "full",
            "timeout_s": 900,
        }
    ]
    return doc


def test_workflows_are_applied_after_their_tasks_and_an_export_brings_them_back_unchanged(
    api: Api,
) -> None:
    first = apply(api, flows_document())
    assert actions(first)[-1] == ("workflow", "nightly", "create")
    flow = api.client.get("/workflows/nightly").json()["workflow"]
    assert flow["tasks"] == ["nightly-report", "ping-billing"]
    assert (flow["schedule"], flow["params"], flow["timeout_s"]) == ("0 0 3 * * *", "full", 900)
    created = api.client.get("/audit", params={"target": "nightly"}).json()["items"]
    assert [(e["action"], e["via"]) for e in created] == [("workflow.created", "apply")]

    again = apply(api, flows_document())  # the tasks' order in the file does not matter
    assert again["applied"] is False and {s["action"] for s in again["steps"]} == {"unchanged"}

    exported = api.client.get("/export").json()
    assert exported["workflows"] == [
        {
            "name": "nightly",
            "description": "report then billing",
            "tasks": ["nightly-report", "ping-billing"],
            "schedule": "0 0 3 * * *",
            "timezone": "Asia/Riyadh",
            "params": "full",
            "timeout_s": 900,
        }
    ]
    round_trip = apply(api, exported, prune=True)
    assert round_trip["applied"] is False
    assert {s["action"] for s in round_trip["steps"]} == {"unchanged"}
    assert api.client.get("/export", params={"node_group": "uae"}).json()["workflows"] == []


def test_a_workflow_is_updated_field_by_field_and_dropped_from_the_file_only_pruned(
    api: Api,
) -> None:
    apply(api, flows_document())
    changed = flows_document()
    changed["workflows"][0].update(tasks=["nightly-report"], enabled=False, timeout_s=0)
    plan = apply(api, changed, dry_run=True)
    step = next(s for s in plan["steps"] if s["kind"] == "workflow")
    assert step["action"] == "update"
    assert {c["field"]: (c["old"], c["new"]) for c in step["changes"]} == {
        "tasks": (["nightly-report", "ping-billing"], ["nightly-report"]),
        "timeout_s": (900, 0),
        "enabled": (True, False),
    }
    assert api.client.get("/workflows/nightly").json()["workflow"]["timeout_s"] == 900  # a dry run
    apply(api, changed)
    flow = api.client.get("/workflows/nightly").json()["workflow"]
    assert (flow["tasks"], flow["enabled"]) == (["nightly-report"], False)

    without = flows_document()
    del without["workflows"]
    kept = apply(api, without)
    assert kept["kept_workflows"] == ["nightly"]
    assert api.client.get("/workflows/nightly").status_code == 200
    pruned = apply(api, without, prune=True)
    assert actions(pruned) == [
        ("node_group", "ksa", "unchanged"),
        ("node_group", "uae", "unchanged"),
        ("task", "nightly-report", "unchanged"),
        ("task", "ping-billing", "unchanged"),
        ("workflow", "nightly", "delete"),
    ]
    assert api.client.get("/workflows/nightly").status_code == 404
    assert [t["name"] for t in api.client.get("/tasks").json()["items"]] == [
        "nightly-report",
        "ping-billing",
    ]


def test_a_bad_workflow_is_refused_naming_its_field_and_nothing_is_applied(api: Api) -> None:
    doc = flows_document()
    doc["workflows"] += [
        {"name": "ghost", "tasks": ["nope"]},
        {"name": "twice", "tasks": ["nightly-report"]},
        {"name": "late", "tasks": ["ping-billing"], "schedule": "every tuesday"},
    ]
    response = api.client.post("/apply", json=doc)
    assert response.status_code == 422, response.text
    errors = {e["field"]: e["error"] for e in response.json()["errors"]}
    assert set(errors) == {"workflows[1].tasks", "workflows[2].tasks", "workflows[3].schedule"}
    assert "'nope' is not" in errors["workflows[1].tasks"]
    assert "is in workflow 'nightly'" in errors["workflows[2].tasks"]
    assert api.client.get("/tasks").json()["items"] == []  # all or nothing
