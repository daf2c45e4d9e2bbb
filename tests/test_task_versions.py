"""Task history: every change keeps a version (who, via what, when), rollback writes an old
definition back as a new version. Through the real API (uvicorn + httpx, the `api` fixture
of test_manager_api), on SQLite and MySQL/MariaDB; the migration's baseline on both."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.audit import trail
from ays_runtime.manager import tasks, versions
from ays_runtime.manager.versions import Actor
from ays_runtime.storage.migrate import alembic_config, upgrade
from ays_runtime.storage.models import AuditEntry, TaskVersion
from ays_runtime.vocabulary import ChangeVia
from tests.test_manager_api import Api, new_group, new_task, served_api


@pytest.fixture
def api(sessions: sessionmaker[Session]) -> Iterator[Api]:
    with served_api(sessions) as served:
        yield served


def history(api: Api, task_id: int) -> list[dict[str, Any]]:
    response = api.client.get(f"/tasks/{task_id}/versions")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["total"] == len(body["items"])
    return list(body["items"])


def test_every_change_of_a_task_keeps_a_version_with_who_changed_what_through_what_and_when(
    api: Api,
) -> None:
    new_group(api)
    task = new_task(api)
    named = {"X-Ays-Actor": "alice@ops1"}
    api.client.put(f"/tasks/{task['id']}", json={"timeout_s": 60, "params": "-v"}, headers=named)
    api.client.post(f"/tasks/{task['id']}/disable")
    api.client.put(f"/tasks/{task['id']}", json={"timeout_s": 60})  # no change: no version
    renamed = api.client.put("/node-groups/node_group_ksa", json={"name": "ksa"})
    assert renamed.status_code == 200, renamed.text

    rows = history(api, task["id"])
    assert [(r["version"], r["change"], r["via"], r["changed_by"]) for r in rows] == [
        (4, "updated", "api", "token"),
        (3, "updated", "api", "token"),
        (2, "updated", "api", "alice@ops1 (token)"),
        (1, "created", "api", "token"),
    ]
    assert [r["changed_fields"] for r in rows[:3]] == [
        ["node_group"],
        ["enabled"],
        ["params", "timeout_s"],
    ]
    assert "schedule" in rows[3]["changed_fields"]
    assert rows[1]["definition"]["timeout_s"] == 60 and rows[3]["definition"]["timeout_s"] == 0
    assert rows[0]["definition"]["node_group"] == "ksa"
    assert api.client.get(f"/tasks/{task['id']}").json()["version"] == 4
    assert all(r["changed_at"] for r in rows)


def test_a_rollback_writes_an_old_definition_back_as_a_new_version(api: Api) -> None:
    new_group(api)
    task = new_task(api, schedule="0 30 2 * * *")
    api.client.put(f"/tasks/{task['id']}", json={"schedule": "*/5 * * * * *", "timeout_s": 9})
    changed_before = api.hooks.changed

    response = api.client.post(f"/tasks/{task['id']}/rollback", json={"version": 1})
    assert response.status_code == 200, response.text
    rolled = response.json()
    assert (rolled["schedule"], rolled["timeout_s"], rolled["version"]) == ("0 30 2 * * *", 0, 3)
    assert api.hooks.changed == changed_before + 1  # reconciled at once
    latest = history(api, task["id"])[0]
    assert (latest["version"], latest["via"], latest["changed_by"]) == (3, "rollback", "token")
    assert latest["changed_fields"] == ["schedule", "timeout_s"]

    again = api.client.post(f"/tasks/{task['id']}/rollback", json={"version": 1}).json()
    assert again["version"] == 3  # it has that definition already: nothing changes


def test_a_rollback_to_a_version_that_does_not_exist_names_the_versions_there_are(
    api: Api,
) -> None:
    new_group(api)
    task = new_task(api)
    api.client.post(f"/tasks/{task['id']}/disable")
    response = api.client.post(f"/tasks/{task['id']}/rollback", json={"version": 7})
    assert response.status_code == 404
    assert response.json()["error"] == f"task {task['id']} has no version 7; its versions are: 1, 2"
    assert api.client.post("/tasks/999/rollback", json={"version": 1}).status_code == 404
    bad = api.client.post(f"/tasks/{task['id']}/rollback", json={"version": 0})
    assert (bad.status_code, bad.json()["field"]) == (422, "version")


def test_a_rollback_to_a_definition_no_longer_valid_is_refused_and_changes_nothing(
    api: Api,
) -> None:
    new_group(api, "old_group")
    new_group(api, "new_group")
    task = new_task(api, node_group="old_group")
    api.client.put(f"/tasks/{task['id']}", json={"node_group": "new_group"})
    assert api.client.delete("/node-groups/old_group").status_code == 204

    response = api.client.post(f"/tasks/{task['id']}/rollback", json={"version": 1})
    assert response.status_code == 422
    body = response.json()
    assert body["field"] == "version" and "node_group" in body["error"]
    assert api.client.get(f"/tasks/{task['id']}").json()["version"] == 2
    assert len(history(api, task["id"])) == 2


def test_a_deleted_tasks_history_stays_readable_by_name_and_never_mixes_with_a_new_task(
    api: Api,
) -> None:
    new_group(api)
    task = new_task(api, name="report")
    api.client.post(f"/tasks/{task['id']}/disable")
    assert api.client.delete(f"/tasks/{task['id']}").status_code == 204
    assert api.client.get(f"/tasks/{task['id']}/versions").status_code == 404

    again = new_task(api, name="report")  # SQLite may hand the same id out again
    assert [r["version"] for r in history(api, again["id"])] == [1]

    response = api.client.get("/task-versions", params={"name": "report"})
    assert response.status_code == 200, response.text
    rows = response.json()["items"]
    assert [(r["task_id"], r["version"], r["change"]) for r in rows] == [
        (again["id"], 1, "created"),
        (None, 3, "deleted"),
        (None, 2, "updated"),
        (None, 1, "created"),
    ]
    assert rows[1]["definition"]["enabled"] is False  # what was deleted


def test_the_console_and_other_callers_name_themselves_to_the_task_service(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as session:
        tasks.create_node_group(session, {"name": "g"})
        body = {"name": "t", "node_group": "g", "schedule": "@every 1m"}
        body["payload"] = {"command": "x"}
        task = tasks.create_task(session, body, actor=Actor("bob", ChangeVia.CONSOLE))
        tasks.disable_task(session, task.id)  # the default: the token, via the API
        rows = tasks.task_versions(session, task.id)
    assert [(r.version, r.changed_by, r.via) for r in rows] == [
        (2, "token", "api"),
        (1, "bob", "console"),
    ]


def test_the_migration_records_the_tasks_that_exist_as_a_baseline(
    unmigrated_database_url: str,
) -> None:
    engine: Engine = sa.create_engine(unmigrated_database_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0003")
            conn.exec_driver_sql(
                "INSERT INTO ays_node_group (name, description, created_at, updated_at) "
                "VALUES ('g', '', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            )
            conn.exec_driver_sql(
                "INSERT INTO ays_task (name, description, node_group, schedule, timezone, "
                "task_type, payload, params, timeout_s, retry_count, retry_backoff, "
                "retry_interval_s, route_strategy, block_strategy, misfire_policy, enabled, "
                "version, created_at, updated_at) VALUES ('old', '', 'g', '@every 1m', 'UTC', "
                "'shell', '{\"command\": \"true\"}', '', 0, 0, 'fixed', 10.0, 'first', "
                "'serial', 'skip', 1, 5, '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            )
        upgrade(unmigrated_database_url)
        with Session(engine) as session:
            row = session.scalars(sa.select(TaskVersion)).one()
            # The fields added since the baseline (allow_concurrent_retry, tags) are not in
            # it: the next change names only what it changed, in the history and the trail.
            task = tasks.update_task(session, row.task_id, {"timeout_s": 5})
            assert task.tags == []
            changed = versions.with_changes(versions.versions_of(session, task.id))
            entry = session.scalars(sa.select(AuditEntry)).one()
            # (the payload too: the raw insert above lacks the `env` the API stores)
            assert changed[0][1] == trail.changed_fields(entry) == ["payload", "timeout_s"]
    finally:
        engine.dispose()
    assert (row.version, row.change, row.via, row.name) == (5, "baseline", "migration", "old")
    assert row.definition["payload"] == {"command": "true"}
    assert row.definition["enabled"] is True and row.definition["retry_interval_s"] == 10.0
