"""The manager's HTTP API, through real HTTP: uvicorn on an ephemeral port, httpx as client.

Every test runs on SQLite and on MySQL/MariaDB (the `sessions` fixture). The manager's hooks
are stand-ins: `on_tasks_changed` counts calls, `trigger_now` inserts a manual job log.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from ays_runtime.alerts.api import alerts_router
from ays_runtime.alerts.service import AlertService
from ays_runtime.alerts.settings import AlertSettings
from ays_runtime.config import EnvConfig
from ays_runtime.exceptions import ValidationError
from ays_runtime.manager import tasks
from ays_runtime.manager.api import create_app
from ays_runtime.manager.context import ManagerContext
from ays_runtime.manager.output import RunOutput
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import JobLog, Node, Task, TriggerKind, WorkflowTask

TOKEN = "s3cret-token-for-tests"
CONFIG = EnvConfig.model_validate(
    {
        "env": "dev",
        "storage": {"url": "sqlite:///unused.db"},
        "registry": {"backend": "builtin"},
        "transport": {"backend": "builtin"},
    }
)


@dataclass
class Hooks:
    """Stand-ins for the manager's reconcile and fire-now."""

    sessions: sessionmaker[Session]
    changed: int = 0
    triggered: list[tuple[int, str | None]] = field(default_factory=list)

    async def on_tasks_changed(self) -> None:
        self.changed += 1

    async def kill_run(self, job_log_id: int, reason: str) -> tuple[bool, str, str]:
        raise AssertionError("kills are tested with a real manager (test_end_to_end.py)")

    async def trigger_now(self, task_id: int, params: str | None) -> int:
        self.triggered.append((task_id, params))
        return await run_in_threadpool(self._insert_manual_run, task_id, params)

    def _insert_manual_run(self, task_id: int, params: str | None) -> int:
        with self.sessions() as session:
            task = session.get(Task, task_id)
            assert task is not None
            now = utcnow()
            log = JobLog(
                task_id=task_id,
                scheduled_at=now,
                trigger=TriggerKind.MANUAL.value,
                params=task.params if params is None else params,
                created_at=now,
            )
            session.add(log)
            session.commit()
            return log.id


@dataclass
class Api:
    client: httpx.Client  # token sent, base URL /api/v1
    base_url: str  # the server's root
    hooks: Hooks
    sessions: sessionmaker[Session]


@pytest.fixture
def api(sessions: sessionmaker[Session]) -> Iterator[Api]:
    with served_api(sessions) as served:
        yield served


@contextmanager
def served_api(
    sessions: sessionmaker[Session], alerts: AlertSettings | None = None
) -> Iterator[Api]:
    """The API on `sessions`, served on an ephemeral port until the block ends; with
    `alerts`, the alert policies' routes and console page too (the service's loops do not
    run: nothing is judged or sent)."""
    hooks = Hooks(sessions)
    ctx = ManagerContext(
        config=CONFIG,
        sessions=sessions,
        access_token=TOKEN,
        manager_id="127.0.0.1:18080",
        on_tasks_changed=hooks.on_tasks_changed,
        trigger_now=hooks.trigger_now,
        kill_run=hooks.kill_run,
        run_output=RunOutput(sessions, TOKEN),
        version="9.9.9-test",
    )
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it every response waits out the client's delayed ACK (~40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(ctx)
    if alerts is not None:
        engine = sessions.kw["bind"]
        app.state.alerts = AlertService(engine, alerts, "dev", ctx.manager_id)
        app.include_router(alerts_router(app.state.alerts))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API server did not start"
        time.sleep(0.01)
    base_url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=f"{base_url}/api/v1", headers=headers, timeout=10) as client:
            yield Api(client, base_url, hooks, sessions)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "the API server did not stop"


def new_group(api: Api, name: str = "node_group_ksa") -> dict[str, Any]:
    response = api.client.post("/node-groups", json={"name": name, "description": "KSA"})
    assert response.status_code == 201, response.text
    return response.json()


def task_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "nightly-report",
        "node_group": "node_group_ksa",
        "schedule": "0 30 2 * * *",
        "payload": {"command": "echo report"},
    }
    body.update(overrides)
    return body


def new_task(api: Api, **overrides: Any) -> dict[str, Any]:
    response = api.client.post("/tasks", json=task_body(**overrides))
    assert response.status_code == 201, response.text
    return response.json()


# --- tasks ----------------------------------------------------------------------------------


def test_a_task_goes_through_create_read_list_update_and_delete(api: Api) -> None:
    new_group(api)
    created = new_task(api, timezone="Asia/Riyadh", params="--full")
    assert created["version"] == 1
    assert created["enabled"] is True
    assert created["route_strategy"] == "first"
    assert created["payload"] == {"command": "echo report", "env": {}}
    task_id = created["id"]
    assert api.client.get(f"/tasks/{task_id}").json() == created
    assert [t["id"] for t in api.client.get("/tasks").json()["items"]] == [task_id]

    response = api.client.put(f"/tasks/{task_id}", json={"timeout_s": 60, "retry_count": 2})
    assert response.status_code == 200, response.text
    updated = response.json()
    assert (updated["timeout_s"], updated["retry_count"], updated["version"]) == (60, 2, 2)
    assert updated["schedule"] == created["schedule"]  # untouched fields keep their values
    assert updated["updated_at"] >= created["updated_at"]

    response = api.client.patch(
        f"/tasks/{task_id}",
        json={"task_type": "http", "payload": {"url": "https://example.com/hook"}},
    )
    assert response.status_code == 200, response.text
    assert response.json()["payload"]["method"] == "GET"
    assert response.json()["version"] == 3

    assert api.client.delete(f"/tasks/{task_id}").status_code == 204
    response = api.client.get(f"/tasks/{task_id}")
    assert response.status_code == 404
    assert response.json() == {"error": f"task {task_id} does not exist"}
    assert api.hooks.changed == 1 + 3 + 1  # the group, then every task change


def test_an_update_that_changes_nothing_keeps_the_version(api: Api) -> None:
    new_group(api)
    task = new_task(api)
    response = api.client.put(f"/tasks/{task['id']}", json={"schedule": task["schedule"]})
    assert response.json()["version"] == 1


def test_the_task_list_pages_and_filters_by_group_enabled_and_name(api: Api) -> None:
    new_group(api, "g1")
    new_group(api, "g2")
    for i in range(5):
        new_task(api, name=f"alpha-{i}", node_group="g1", enabled=i % 2 == 0)
    new_task(api, name="beta_50%", node_group="g2")

    page = api.client.get("/tasks", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 6
    assert [t["name"] for t in page["items"]] == ["alpha-1", "alpha-2"]

    def names(**params: Any) -> list[str]:
        return [t["name"] for t in api.client.get("/tasks", params=params).json()["items"]]

    assert names(node_group="g2") == ["beta_50%"]
    assert names(node_group="g1", enabled="false") == ["alpha-1", "alpha-3"]
    assert names(name="pha-4") == ["alpha-4"]
    assert names(name="_50%") == ["beta_50%"]  # LIKE wildcards are matched literally
    assert api.client.get("/tasks", params={"limit": 1001}).status_code == 422


def test_tags_are_kept_sorted_without_duplicates_and_the_list_filters_by_every_tag_asked(
    api: Api,
) -> None:
    new_group(api)
    both = new_task(api, name="both", tags=["nightly", "billing", "nightly"])
    assert both["tags"] == ["billing", "nightly"]
    new_task(api, name="billing-only", tags=["billing"])
    new_task(api, name="look-alike", tags=["billingx", "axb"])
    new_task(api, name="untagged")
    assert api.client.get(f"/tasks/{both['id']}").json()["tags"] == ["billing", "nightly"]

    def names(*tags: str) -> list[str]:
        response = api.client.get("/tasks", params={"tag": list(tags)})
        assert response.status_code == 200, response.text
        return [t["name"] for t in response.json()["items"]]

    assert names("billing") == ["both", "billing-only"]
    assert names("billing", "nightly") == ["both"]  # repeated: every one of them
    assert names("a_b") == []  # LIKE wildcards are matched literally
    assert names() == ["both", "billing-only", "look-alike", "untagged"]
    response = api.client.get("/tasks", params={"tag": "Billing"})
    assert response.status_code == 422
    assert (response.json()["field"], response.json()["value"]) == ("tag", "Billing")
    too_many = api.client.get("/tasks", params={"tag": [f"t{i}" for i in range(21)]})
    assert (too_many.status_code, too_many.json()["field"]) == (422, "tag")

    replaced = api.client.patch(f"/tasks/{both['id']}", json={"tags": ["ops"]}).json()
    assert (replaced["tags"], replaced["version"]) == (["ops"], 2)
    kept = api.client.patch(f"/tasks/{both['id']}", json={"timeout_s": 5}).json()
    assert kept["tags"] == ["ops"]  # a change that does not name them keeps them
    cleared = api.client.patch(f"/tasks/{both['id']}", json={"tags": []}).json()
    assert cleared["tags"] == []
    history = api.client.get(f"/tasks/{both['id']}/versions").json()["items"]
    assert [v["changed_fields"] for v in history[:3]] == [["tags"], ["timeout_s"], ["tags"]]
    assert history[-1]["definition"]["tags"] == ["billing", "nightly"]


def test_enable_and_disable_bump_the_version_and_reconcile_at_once(api: Api) -> None:
    new_group(api)
    task = new_task(api)
    changed_before = api.hooks.changed

    disabled = api.client.post(f"/tasks/{task['id']}/disable").json()
    assert (disabled["enabled"], disabled["version"]) == (False, 2)
    assert api.hooks.changed == changed_before + 1

    again = api.client.post(f"/tasks/{task['id']}/disable").json()
    assert again["version"] == 2  # nothing changed

    enabled = api.client.post(f"/tasks/{task['id']}/enable").json()
    assert (enabled["enabled"], enabled["version"]) == (True, 3)
    assert api.hooks.changed == changed_before + 3
    assert api.client.post("/tasks/999/enable").status_code == 404


def test_trigger_now_returns_the_job_log_and_passes_the_params_override(api: Api) -> None:
    new_group(api)
    task = new_task(api, params="--default")

    response = api.client.post(f"/tasks/{task['id']}/trigger", json={"params": "--only-today"})
    assert response.status_code == 202, response.text
    log = api.client.get(f"/job-logs/{response.json()['job_log_id']}").json()
    assert (log["task_id"], log["trigger"], log["params"]) == (task["id"], "manual", "--only-today")

    response = api.client.post(f"/tasks/{task['id']}/trigger")  # no body: the task's params
    assert response.status_code == 202, response.text
    assert api.hooks.triggered == [(task["id"], "--only-today"), (task["id"], None)]
    assert api.client.post("/tasks/999/trigger").status_code == 404
    assert len(api.hooks.triggered) == 2


BAD_FIELDS = [  # (what the request changes, the field named, the bad value named)
    ({"schedule": "0 61 * * * *"}, "schedule", "0 61 * * * *"),
    ({"schedule": "*/61 * * * * *"}, "schedule", "*/61 * * * * *"),  # a step past the range
    ({"schedule": "0 */25 * * *"}, "schedule", "0 */25 * * *"),
    ({"timezone": "Mars/Olympus"}, "timezone", "Mars/Olympus"),
    ({"node_group": "nowhere"}, "node_group", "nowhere"),
    ({"timeout_s": -5}, "timeout_s", -5),
    ({"route_strategy": "fastest"}, "route_strategy", "fastest"),
    ({"block_strategy": "queue"}, "block_strategy", "queue"),
    ({"misfire_policy": "catch_up"}, "misfire_policy", "catch_up"),
    ({"task_type": "http", "payload": {"method": "POST"}}, "payload.url", None),
    ({"colour": "blue"}, "colour", "blue"),
    ({"tags": ["Billing"]}, "tags.0", "Billing"),
    ({"tags": ["ok", "a,b"]}, "tags.1", "a,b"),
    ({"tags": ["x" * 33]}, "tags.0", "x" * 33),
    ({"tags": "billing"}, "tags", "billing"),
    ({"tags": [f"t{i}" for i in range(21)]}, "tags", [f"t{i}" for i in range(21)]),
]


def test_every_bad_field_is_refused_with_a_message_naming_the_field_and_the_value(
    api: Api,
) -> None:
    # One server for all cases: a server (and database) per case would double the run time.
    new_group(api)
    valid = new_task(api, name="valid")
    for overrides, named, value in BAD_FIELDS:
        response = api.client.post("/tasks", json=task_body(**overrides))
        assert response.status_code == 422, (overrides, response.text)
        body = response.json()
        assert (body["field"], body["value"]) == (named, value), overrides
        assert body["error"].startswith(f"{named}: {value!r} is not valid: "), body
        response = api.client.put(f"/tasks/{valid['id']}", json=overrides)
        assert response.status_code == 422, (overrides, response.text)
        assert response.json()["field"] == named, overrides
    tasks_now = api.client.get("/tasks").json()
    assert tasks_now["total"] == 1  # nothing half-stored
    assert tasks_now["items"][0]["version"] == 1


def test_the_messages_say_what_is_expected(api: Api) -> None:
    new_group(api)

    def error(**overrides: Any) -> str:
        return api.client.post("/tasks", json=task_body(**overrides)).json()["error"]

    assert error(node_group="nowhere") == (
        "node_group: 'nowhere' is not valid: no such node group: no node has joined it yet; "
        "start a node with -g nowhere (the group is created when it joins), or create the "
        "group with POST /api/v1/node-groups"
    )
    assert "'first', 'round_robin'" in error(route_strategy="fastest")
    assert "the fields are name, description" in error(colour="blue")
    assert "IANA time zone" in error(timezone="Mars/Olympus")
    assert "the second field's step must be 1 to 59 (second runs 0-59)" in error(
        schedule="*/61 * * * * *"
    )
    assert "the hour field's step must be 1 to 23 (hour runs 0-23)" in error(
        schedule="0 */25 * * *"
    )
    assert "http:// or https://" in error(task_type="http", payload={"url": "ftp://x"})


def test_a_duplicate_task_name_is_a_conflict(api: Api) -> None:
    new_group(api)
    first = new_task(api)
    response = api.client.post("/tasks", json=task_body())
    assert response.status_code == 409
    assert response.json() == {
        "error": f"name: task name 'nightly-report' is already taken by task {first['id']}; "
        "choose another"
    }
    other = new_task(api, name="other")
    response = api.client.put(f"/tasks/{other['id']}", json={"name": "nightly-report"})
    assert response.status_code == 409


def test_the_task_service_validates_without_http(api: Api) -> None:
    new_group(api)
    with api.sessions() as session:
        task = tasks.create_task(session, task_body(name="direct"))
        assert task.version == 1
        with pytest.raises(ValidationError) as caught:
            tasks.update_task(session, task.id, {"retry_count": 101})
        assert (caught.value.field, caught.value.value) == ("retry_count", 101)


def test_a_task_deleted_leaves_its_workflow_and_no_membership_row_behind(api: Api) -> None:
    """The membership goes with the task on both backends (SQLite enforces the foreign
    key's cascade only with foreign keys on: `make_engine` turns them on)."""
    new_group(api)
    gone, kept = new_task(api, name="extract"), new_task(api, name="load")
    made = api.client.post("/workflows", json={"name": "etl", "tasks": ["extract", "load"]})
    assert made.status_code == 201, made.text
    assert api.client.delete(f"/tasks/{gone['id']}").status_code == 204
    assert api.client.get("/workflows/etl").json()["workflow"]["tasks"] == ["load"]
    with api.sessions() as session:
        members = session.execute(select(WorkflowTask.task_id)).scalars().all()
    assert members == [kept["id"]]


# --- the token ------------------------------------------------------------------------------


def test_a_call_without_a_token_is_refused_and_logged(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ays.manager.api"):
        response = httpx.get(f"{api.base_url}/api/v1/tasks")
    assert response.status_code == 401
    assert "access token" in response.json()["error"]
    assert response.headers["www-authenticate"] == "Bearer"
    assert (
        "manager 127.0.0.1:18080: refused GET /api/v1/tasks from 127.0.0.1: "
        "bad or missing access token (401)"
    ) in caplog.messages


def test_a_wrong_token_is_refused_and_never_logged_and_refusals_are_logged_once_per_source(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    for headers in (
        {"Authorization": "Bearer wrong-token"},
        {"X-Ays-Token": "wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},  # the right token, but not as a bearer token
    ):
        with caplog.at_level(logging.WARNING, logger="ays.manager.api"):
            response = httpx.post(f"{api.base_url}/api/v1/node-groups", headers=headers, json={})
        assert response.status_code == 401, headers
    # The first refusal is logged; the next ones from the same source are counted for the
    # minute's summary line (tests/test_refusals.py), not logged one by one.
    assert caplog.text.count("refused POST /api/v1/node-groups from 127.0.0.1") == 1
    assert "wrong-token" not in caplog.text and TOKEN not in caplog.text


def test_the_token_may_come_in_the_x_ays_token_header(api: Api) -> None:
    response = httpx.get(f"{api.base_url}/api/v1/nodes", headers={"X-Ays-Token": TOKEN})
    assert response.status_code == 200


def test_health_needs_no_token(api: Api) -> None:
    response = httpx.get(f"{api.base_url}/api/v1/health")
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["manager_id"], body["version"]) == (
        "ok",
        "127.0.0.1:18080",
        "9.9.9-test",
    )
    assert body["uptime_s"] >= 0


def test_the_openapi_document_is_public_and_lists_the_task_routes(api: Api) -> None:
    document = httpx.get(f"{api.base_url}/openapi.json").json()
    paths = document["paths"]
    assert set(paths["/api/v1/tasks"]) == {"get", "post"}
    assert set(paths["/api/v1/tasks/{task_id}"]) == {"get", "put", "patch", "delete"}
    for action in ("enable", "disable", "trigger"):
        assert "post" in paths[f"/api/v1/tasks/{{task_id}}/{action}"]
    assert {"/api/v1/job-logs", "/api/v1/nodes", "/api/v1/node-groups/{name}"} <= set(paths)
    assert "security" not in paths["/api/v1/health"]["get"]
    assert paths["/api/v1/tasks"]["get"]["security"]
    assert httpx.get(f"{api.base_url}/docs").status_code == 200


# --- job logs, nodes, node groups -----------------------------------------------------------


def test_job_logs_filter_by_task_status_node_and_time_and_page(api: Api) -> None:
    new_group(api)
    t1, t2 = new_task(api, name="t1")["id"], new_task(api, name="t2")["id"]
    start = utcnow().replace(microsecond=0) - timedelta(hours=1)
    rows = [  # (task, status, node, minutes after start)
        (t1, "succeeded", "10.0.0.1:18181", 0),
        (t1, "failed", "10.0.0.2:18181", 10),
        (t2, "succeeded", "10.0.0.1:18181", 20),
        (t1, "succeeded", "10.0.0.1:18181", 30),
    ]
    with api.sessions() as session:
        for task_id, status, node, minutes in rows:
            at = start + timedelta(minutes=minutes)
            session.add(
                JobLog(
                    task_id=task_id,
                    scheduled_at=at,
                    status=status,
                    node=node,
                    created_at=at,
                    exit_code=0,
                    output=f"run at {minutes}",
                )
            )
        session.commit()

    def outputs(**params: Any) -> list[str]:
        response = api.client.get("/job-logs", params=params)
        assert response.status_code == 200, response.text
        return [j["output"] for j in response.json()["items"]]

    assert outputs() == ["run at 30", "run at 20", "run at 10", "run at 0"]  # newest first
    assert outputs(task_id=t1) == ["run at 30", "run at 10", "run at 0"]
    assert outputs(status="failed") == ["run at 10"]
    assert outputs(node="10.0.0.1:18181", task_id=t1) == ["run at 30", "run at 0"]
    since, until = start + timedelta(minutes=10), start + timedelta(minutes=30)
    assert outputs(since=since.isoformat(), until=until.isoformat()) == ["run at 20", "run at 10"]
    page = api.client.get("/job-logs", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 4 and [j["output"] for j in page["items"]] == ["run at 20", "run at 10"]

    one = page["items"][0]
    assert api.client.get(f"/job-logs/{one['id']}").json() == one
    assert set(one) >= {"attempt", "shard_index", "claim", "manager_id", "started_at", "message"}
    assert api.client.get("/job-logs/99999").status_code == 404
    response = api.client.get("/job-logs", params={"status": "lost"})
    assert response.status_code == 422 and response.json()["field"] == "status"
    response = api.client.get("/job-logs", params={"since": "yesterday"})
    assert response.status_code == 422 and response.json()["value"] == "yesterday"


def test_nodes_are_listed_by_group_and_status(api: Api) -> None:
    now = utcnow()
    with api.sessions() as session:
        for ip, group, status in [
            ("10.0.0.1", "g1", "online"),
            ("10.0.0.2", "g1", "offline"),
            ("10.0.0.3", "g2", "online"),
        ]:
            session.add(
                Node(
                    ip=ip,
                    port=18181,
                    node_group=group,
                    status=status,
                    created_at=now,
                    updated_at=now,
                )
            )
        session.commit()

    def addresses(**params: Any) -> list[str]:
        return [n["address"] for n in api.client.get("/nodes", params=params).json()["items"]]

    assert addresses() == ["10.0.0.1:18181", "10.0.0.2:18181", "10.0.0.3:18181"]
    assert addresses(node_group="g1", status="online") == ["10.0.0.1:18181"]
    assert api.client.get("/nodes", params={"status": "dead"}).status_code == 422


def test_a_node_group_goes_through_create_read_rename_and_delete(api: Api) -> None:
    group = new_group(api, "old_name")
    assert api.client.get("/node-groups/old_name").json() == group
    assert api.client.post("/node-groups", json={"name": "old_name"}).status_code == 409
    response = api.client.post("/node-groups", json={"name": "has space"})
    assert response.status_code == 422 and response.json()["field"] == "name"
    task = new_task(api, node_group="old_name")

    response = api.client.put("/node-groups/old_name", json={"name": "new_name"})
    assert response.status_code == 200, response.text
    moved = api.client.get(f"/tasks/{task['id']}").json()
    assert (moved["node_group"], moved["version"]) == ("new_name", 2)
    assert [g["name"] for g in api.client.get("/node-groups").json()["items"]] == ["new_name"]
    assert api.client.get("/node-groups/old_name").status_code == 404

    api.client.delete(f"/tasks/{task['id']}")
    assert api.client.delete("/node-groups/new_name").status_code == 204
    assert api.client.get("/node-groups").json() == {"items": [], "total": 0}


def test_a_node_group_in_use_cannot_be_deleted(api: Api) -> None:
    new_group(api)
    new_task(api, name="a")
    new_task(api, name="b")
    response = api.client.delete("/node-groups/node_group_ksa")
    assert response.status_code == 409
    assert response.json()["error"] == (
        "node group 'node_group_ksa' is used by 2 task(s); "
        "move them to another group or delete them first"
    )
    assert api.client.get("/node-groups/node_group_ksa").status_code == 200
