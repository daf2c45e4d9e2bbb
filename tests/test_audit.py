"""The audit trail: every change (tasks, node groups, nodes), trigger and kill has an entry with
who, through what, from where, when, and the definition before and after; read through
GET /api/v1/audit, filtered and paged; purged with the retention.

The API tests run on SQLite and MySQL/MariaDB (the `sessions` fixture); nodes added by hand and
kills go through a real manager (and node) on loopback.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.manager.retention import AUDIT_ENTRIES, purge_old
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import AuditEntry
from tests.daemons import Cluster, cluster, wait_for
from tests.test_manager_api import Api, new_group, new_task, served_api


def trail(api: Api, **params: Any) -> list[dict[str, Any]]:
    response = api.client.get("/audit", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["total"] >= len(body["items"])
    items: list[dict[str, Any]] = body["items"]
    return items


def test_every_change_of_a_task_is_an_entry_with_who_where_and_its_diff(
    sessions: sessionmaker[Session],
) -> None:
    with served_api(sessions) as api:
        new_group(api)
        task = new_task(api)
        named = {"X-Ays-Actor": "alice@ops-1"}
        changed = api.client.patch(f"/tasks/{task['id']}", json={"timeout_s": 90}, headers=named)
        assert changed.status_code == 200, changed.text
        assert api.client.post(f"/tasks/{task['id']}/disable").status_code == 200
        back = api.client.post(f"/tasks/{task['id']}/rollback", json={"version": 1})
        assert back.status_code == 200, back.text
        assert api.client.delete(f"/tasks/{task['id']}").status_code == 204

        entries = trail(api, target_type="task", target="nightly-report")
    newest_first = [(e["action"], e["via"], e["changed_fields"]) for e in entries]
    assert newest_first == [
        ("task.deleted", "api", list(entries[0]["before"])),
        ("task.updated", "rollback", ["timeout_s", "enabled"]),
        ("task.updated", "api", ["enabled"]),
        ("task.updated", "api", ["timeout_s"]),
        ("task.created", "api", list(entries[-1]["after"])),
    ]
    deleted, rolled_back, disabled, patched, created = entries
    assert deleted["after"] is None and deleted["before"]["name"] == "nightly-report"
    assert created["before"] is None and created["after"]["schedule"] == "0 30 2 * * *"
    assert (patched["before"]["timeout_s"], patched["after"]["timeout_s"]) == (0, 90)
    assert patched["who"] == "alice@ops-1 (token)" and disabled["who"] == "token"
    assert (disabled["before"]["enabled"], disabled["after"]["enabled"]) == (True, False)
    assert rolled_back["after"]["enabled"] is True
    assert {e["source"] for e in entries} == {"127.0.0.1"}
    assert all(e["at"].endswith("Z") for e in entries)


def test_node_groups_apply_and_triggers_are_audited(sessions: sessionmaker[Session]) -> None:
    with served_api(sessions) as api:
        new_group(api, "g1")
        renamed = api.client.put("/node-groups/g1", json={"name": "g2", "description": "two"})
        assert renamed.status_code == 200, renamed.text
        document = {
            "node_groups": [{"name": "g3", "description": "by code"}],
            "tasks": [
                {
                    "name": "coded",
                    "node_group": "g3",
                    "schedule": "@every 1h",
                    "payload": {"command": "true"},
                }
            ],
        }
        applied = api.client.post("/apply", json=document)
        assert applied.status_code == 200, applied.text
        task_id = api.client.get("/tasks", params={"name": "coded"}).json()["items"][0]["id"]
        fired = api.client.post(f"/tasks/{task_id}/trigger", json={"params": "--once"})
        assert fired.status_code == 202, fired.text
        assert api.client.delete("/node-groups/g2").status_code == 204

        groups = trail(api, target_type="node_group")
        coded = trail(api, target="coded")
        triggers = trail(api, action="task.triggered")
    assert [(e["action"], e["target"], e["via"]) for e in groups] == [
        ("node_group.deleted", "g2", "api"),
        ("node_group.created", "g3", "apply"),
        ("node_group.updated", "g1", "api"),
        ("node_group.created", "g1", "api"),
    ]
    assert groups[2]["before"] == {"name": "g1", "description": "KSA"}
    assert groups[2]["after"] == {"name": "g2", "description": "two"}
    assert groups[2]["changed_fields"] == ["name", "description"]
    assert [e["action"] for e in coded] == ["task.triggered", "task.created"]
    assert coded[1]["via"] == "apply"
    assert triggers[0]["after"] == {"job_log_id": fired.json()["job_log_id"], "params": "--once"}


def test_the_trail_filters_pages_and_refuses_bad_filters_with_a_422(
    sessions: sessionmaker[Session],
) -> None:
    with served_api(sessions) as api:
        for name in ("a", "b", "c"):
            new_group(api, name)
        page = api.client.get("/audit", params={"limit": 2, "offset": 1}).json()
        assert page["total"] == 3
        assert [e["target"] for e in page["items"]] == ["b", "a"]
        assert trail(api, who="nobody") == []
        assert len(trail(api, since=(utcnow() - timedelta(minutes=5)).isoformat() + "Z")) == 3
        assert trail(api, until="2000-01-01T00:00:00Z") == []
        for params, field in (
            ({"action": "task.exploded"}, "action"),
            ({"limit": 0}, "limit"),
            ({"since": "yesterday"}, "since"),
            ({"offset": 2**64}, "offset"),
        ):
            response = api.client.get("/audit", params=params)
            assert response.status_code == 422, (params, response.text)
            assert response.json()["field"] == field
        assert (
            api.client.get("/audit", headers={"Authorization": "Bearer wrong"}).status_code == 401
        )


def test_old_entries_are_purged_with_the_retention(engine: Engine) -> None:
    old, new = utcnow() - timedelta(days=400), utcnow()
    row = {"who": "token", "via": "api", "source": "", "action": "task.created"}
    with engine.begin() as conn:
        conn.execute(
            insert(AuditEntry),
            [{**row, "at": old, "target_type": "task", "target": f"t{i}"} for i in range(5)]
            + [{**row, "at": new, "target_type": "task", "target": "kept"}],
        )
    assert asyncio.run(purge_old(engine, timedelta(days=365), 2, AUDIT_ENTRIES)) == 5
    with engine.connect() as conn:
        assert conn.execute(select(AuditEntry.target)).scalars().all() == ["kept"]
        assert conn.execute(select(func.count()).select_from(AuditEntry)).scalar_one() == 1


def test_nodes_added_and_removed_by_hand_and_kills_are_audited(tmp_path: Path) -> None:
    with cluster(tmp_path, Cluster) as ays, ays.api() as api:
        added = api.post("/nodes", json={"ip": "10.9.8.7", "port": 18999, "node_group": "g1"})
        assert added.status_code == 201, added.text
        assert api.delete(f"/nodes/{added.json()['id']}").status_code == 204
        task = api.post(
            "/tasks",
            json={
                "name": "long",
                "node_group": "g1",
                "schedule": "@every 1h",
                "payload": {"command": "echo started; sleep 300"},
            },
        ).json()
        run = api.post(f"/tasks/{task['id']}/trigger").json()["job_log_id"]
        wait_for(
            lambda: api.get(f"/job-logs/{run}").json()["status"] in ("dispatched", "running"),
            60,
            "the run on its node",
        )
        killed = api.post(f"/job-logs/{run}/kill", json={"reason": "audit test"}, timeout=90)
        assert killed.status_code == 202, killed.text

        nodes = api.get("/audit", params={"target_type": "node"}).json()["items"]
        kills = api.get("/audit", params={"target": f"run {run}"}).json()["items"]
    assert [(e["action"], e["target"]) for e in nodes] == [
        ("node.removed", "10.9.8.7:18999"),
        ("node.added", "10.9.8.7:18999"),
    ]
    assert nodes[0]["before"] == {"ip": "10.9.8.7", "port": 18999, "node_group": "g1"}
    [kill] = kills
    assert kill["action"] == "run.killed" and kill["after"]["reason"] == "audit test"
    assert kill["after"]["status"] == "killed" and kill["who"] == "token"
