"""The web console over plain HTTP (httpx): what a browser without a session gets, sign-in and
its cookie, CSRF, the API and the console kept apart, the task form's field errors.

The manager's app is served as in test_manager_api.py (real HTTP, SQLite and MariaDB); the
real-browser tests are in test_console_browser.py.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.alerts.settings import AlertSettings
from ays_runtime.console.session import COOKIE, SessionGate
from ays_runtime.manager.api import PUBLIC
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import AlertChannelRow, SlotMiss, Task
from tests.test_manager_api import TOKEN, Api, new_group, new_task, served_api

PAGES = [
    "/",
    "/tasks",
    "/tasks/new",
    "/tasks/1",
    "/tasks/1/edit",
    "/tasks/1/clone",
    "/tasks/1/delete",
    "/tasks/cron-preview?schedule=*+*+*+*+*",
    "/runs",
    "/runs/1",
    "/nodes",
    "/forecast",
    "/forecast/cell?at=2026-01-01T00:00",
    "/slots?task_id=1",
    "/alerts",
    "/alerts/rules/new",
    "/alerts/channels/new",
    "/no-such-page",
]
WRITES = [
    "/logout",
    "/tasks/new",
    "/tasks/bulk",
    "/tasks/1/edit",
    "/tasks/1/enable",
    "/tasks/1/disable",
    "/tasks/1/trigger",
    "/tasks/1/delete",
    "/runs/1/kill",
    "/runs/1/rerun",
    "/nodes/add",
    "/nodes/1/remove",
    "/groups/add",
    "/groups/g1/delete",
    "/alerts/rules",
    "/alerts/channels",
    "/alerts/channels/x/test",
    "/alerts/rules/x/silence",
]


@pytest.fixture
def console(sessions: sessionmaker[Session]) -> Iterator[Api]:
    with served_api(sessions) as served:
        yield served


def browser(api: Api) -> httpx.Client:
    return httpx.Client(base_url=api.base_url, timeout=10, follow_redirects=False)


@contextmanager
def signed_in(api: Api) -> Iterator[tuple[httpx.Client, str]]:
    """A client with a session cookie, and the session's CSRF token."""
    with browser(api) as client:
        yield _sign_in(api, client)


def _sign_in(api: Api, client: httpx.Client) -> tuple[httpx.Client, str]:
    answer = client.post("/login", data={"token": TOKEN, "next": "/tasks"})
    assert answer.status_code == 303 and answer.headers["location"] == "/tasks"
    page = client.get("/tasks/new")
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found
    return client, found.group(1)


def task_form(csrf: str, **changes: str) -> dict[str, str]:
    form = {
        "csrf_token": csrf,
        "name": "nightly",
        "description": "",
        "node_group": "node_group_ksa",
        "schedule": "0 */5 * * * *",
        "timezone": "UTC",
        "task_type": "shell",
        "command": "echo hello",
        "env": "",
        "workdir": "",
        "params": "",
        "timeout_s": "0",
        "retry_count": "0",
        "retry_backoff": "fixed",
        "retry_interval_s": "10",
        "route_strategy": "first",
        "block_strategy": "serial",
        "misfire_policy": "skip",
        "enabled": "on",
    }
    form.update(changes)
    return form


def field_errors(html: str) -> dict[str, str]:
    """field -> the error shown beside it (the element ids say which field)."""
    found = re.findall(r'class="error field-error" id="([^"]+)-error">([^<]*)<', html)
    return {field: message for field, message in found}


def test_no_page_or_fragment_answers_without_a_session(console: Api) -> None:
    with browser(console) as client:
        for path in PAGES:
            page = client.get(path)
            assert page.status_code == 303, path
            assert page.headers["location"].startswith("/login?next=%2F"), path
            assert "task" not in page.text.lower(), path
            fragment = client.get(path, headers={"HX-Request": "true"})
            assert fragment.status_code == 401 and fragment.headers["hx-redirect"] == "/login"
        stream = client.get("/runs/1/output/stream", headers={"Accept": "text/event-stream"})
        assert stream.status_code == 401
        for path in WRITES:
            assert client.post(path, data={"csrf_token": "x"}).status_code == 401, path


def test_only_the_sign_in_page_and_static_assets_are_public_in_the_console() -> None:
    console_public = {p for p in PUBLIC.paths if not p.startswith(("/api/", "/docs", "/open"))}
    # the OIDC sign-in's start and callback (console/oidc.py) come before any session
    assert console_public == {"/login", "/login/oidc", "/login/oidc/callback", "/favicon.ico"}
    assert PUBLIC.prefixes == ("/static/",)


def test_a_wrong_token_is_refused_and_the_right_one_sets_a_strict_httponly_cookie(
    console: Api,
) -> None:
    with browser(console) as client:
        assert client.get("/login").status_code == 200
        wrong = client.post("/login", data={"token": "nope", "next": "/"})
        assert wrong.status_code == 401 and "not this environment" in wrong.text
        assert COOKIE not in wrong.headers.get("set-cookie", "")
        for elsewhere in ("https://evil.example/", "//evil.example/", "/\\evil.example/"):
            away = client.post("/login", data={"token": TOKEN, "next": elsewhere})
            assert away.headers["location"] == "/", elsewhere
        client.cookies.clear()
        right = client.post("/login", data={"token": TOKEN, "next": "https://evil.example/"})
        assert right.status_code == 303 and right.headers["location"] == "/"
        cookie = right.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        for part in ("HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"):
            assert part in cookie
        assert TOKEN not in cookie
        page = client.get("/tasks")
        assert page.status_code == 200 and page.headers["x-frame-options"] == "DENY"


def test_the_api_takes_no_session_and_the_console_no_token(console: Api) -> None:
    with signed_in(console) as (client, _):
        assert client.get("/api/v1/tasks").status_code == 401
        token_only = browser(console)
        page = token_only.get("/tasks", headers={"Authorization": f"Bearer {TOKEN}"})
        assert page.status_code == 303
        token_only.close()


def test_a_write_without_its_csrf_token_is_refused_and_changes_nothing(console: Api) -> None:
    new_group(console)
    with signed_in(console) as (client, csrf):
        for bad in ("", "0" * 64):
            refused = client.post("/tasks/new", data=task_form(bad))
            assert refused.status_code == 403, refused.text
            assert "CSRF" in refused.text
        assert console.client.get("/tasks").json()["total"] == 0
        # another session's token is not this one's
        with signed_in(console) as (_, other_csrf):
            pass
        assert other_csrf != csrf
        assert client.post("/tasks/new", data=task_form(other_csrf)).status_code == 403
        created = client.post("/tasks/new", data=task_form(csrf))
        assert created.status_code == 303, created.text
        task_id = console.client.get("/tasks").json()["items"][0]["id"]
        # an htmx write carries it as a header
        headers = {"X-CSRF-Token": csrf, "HX-Request": "true"}
        assert client.post(f"/tasks/{task_id}/disable").status_code == 403
        assert client.post(f"/tasks/{task_id}/disable", headers=headers).status_code == 303
        assert console.client.get(f"/tasks/{task_id}").json()["enabled"] is False
        versions = console.client.get(f"/tasks/{task_id}/versions").json()["items"]
        assert {v["via"] for v in versions} == {"console"}


def test_signing_out_ends_the_session_even_for_a_copy_of_its_cookie(console: Api) -> None:
    with signed_in(console) as (client, csrf):
        value = client.cookies[COOKIE]
        out = client.post("/logout", data={"csrf_token": csrf})
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert "Max-Age=0" in out.headers["set-cookie"]
        assert client.get("/tasks").status_code == 303
    with browser(console) as thief:
        thief.cookies.set(COOKIE, value)
        assert thief.get("/tasks").status_code == 303


def test_a_session_expires_and_a_forged_one_is_refused() -> None:
    now = [1_000_000.0]
    gate = SessionGate(TOKEN, hours=1, clock=lambda: now[0])
    session, value = gate.issue()
    assert gate.read(value) == session
    body, signature = value.split(".")
    assert gate.read(f"{body}.{signature[::-1]}") is None
    assert SessionGate("another-token", hours=1, clock=lambda: now[0]).read(value) is None
    now[0] += 3601
    assert gate.read(value) is None


def test_the_task_form_shows_each_bad_field_beside_it_and_keeps_what_was_typed(
    console: Api,
) -> None:
    new_group(console)
    with signed_in(console) as (client, csrf):
        answer = client.post(
            "/tasks/new",
            data=task_form(csrf, schedule="*/61 * * * *", timeout_s="soon", retry_count="500"),
        )
        assert answer.status_code == 422
        errors = field_errors(answer.text)
        assert "*/61" in errors["schedule"]
        assert "whole number" in errors["timeout_s"]
        assert "retry_count" in errors and "100" in errors["retry_count"]
        assert 'value="*/61 * * * *"' in answer.text
        assert 'aria-describedby="schedule-error schedule-hint" aria-invalid="true"' in re.sub(
            r"\s+", " ", answer.text
        )
        empty = client.post("/tasks/new", data=task_form(csrf, command="", node_group="nope"))
        errors = field_errors(empty.text)
        assert "payload-command" in errors
        assert console.client.get("/tasks").json()["total"] == 0


def test_the_cron_helper_lists_the_next_ten_fires_in_the_tasks_time_zone(console: Api) -> None:
    with signed_in(console) as (client, _):
        fires = client.get(
            "/tasks/cron-preview",
            params={"schedule": "0 30 9 * * *", "timezone": "Asia/Riyadh"},
            headers={"HX-Request": "true"},
        )
        assert fires.status_code == 200
        assert len(re.findall(r"09:30:00 \+03", fires.text)) == 10
        bad = client.get("/tasks/cron-preview", params={"schedule": "61 * * * * *"})
        assert "schedule:" in bad.text and "not valid" in bad.text


def test_docs_load_swagger_ui_from_the_managers_own_assets(console: Api) -> None:
    with browser(console) as client:
        docs = client.get("/docs")
        assert docs.status_code == 200
        for url in re.findall(r'(?:src|href)="([^"]+)"', docs.text):
            assert url.startswith("/static/vendor/swagger-ui-dist-"), url
            assert client.get(url).status_code == 200, url
        assert "cdn" not in docs.text.lower()


def test_the_task_pages_bulk_disable_clone_delete_after_asking_and_trigger_with_params(
    console: Api,
) -> None:
    new_group(console)
    first = new_task(console, name="alpha", params="--full")
    second = new_task(console, name="beta")
    with signed_in(console) as (client, csrf):
        listed = client.get("/tasks", params={"q": "alp"}, headers={"HX-Request": "true"})
        assert "alpha" in listed.text and "beta" not in listed.text
        assert "<html" not in listed.text  # the fragment alone
        bulk = client.post(
            "/tasks/bulk",
            data={"csrf_token": csrf, "action": "disable", "task_id": [first["id"], second["id"]]},
        )
        assert bulk.status_code == 303
        assert console.client.get("/tasks", params={"enabled": False}).json()["total"] == 2
        clone = client.get(f"/tasks/{first['id']}/clone")
        assert 'value="alpha-copy"' in clone.text and 'value="--full"' in clone.text
        created = client.post(
            "/tasks/new",
            data=task_form(csrf, name="alpha-copy", command="echo report", params="--full"),
        )
        assert created.status_code == 303
        trigger = client.post(
            f"/tasks/{first['id']}/trigger",
            data={"csrf_token": csrf, "override": "on", "params": "--dry-run"},
        )
        assert trigger.status_code == 303 and trigger.headers["location"].startswith("/runs/")
        assert console.hooks.triggered[-1] == (first["id"], "--dry-run")
        run = client.get(trigger.headers["location"])
        assert run.status_code == 200 and "--dry-run" in run.text
        asking = client.get(f"/tasks/{second['id']}/delete")
        assert asking.status_code == 200 and "Delete beta" in asking.text
        assert console.client.get(f"/tasks/{second['id']}").status_code == 200
        deleted = client.post(f"/tasks/{second['id']}/delete", data={"csrf_token": csrf})
        assert deleted.status_code == 303
        assert console.client.get(f"/tasks/{second['id']}").status_code == 404
        missing = client.get(f"/tasks/{second['id']}")
        assert missing.status_code == 404 and "<html" in missing.text
    # Each change, and the trigger, is in the audit trail as made through the console.
    trail = console.client.get("/audit", params={"limit": 20}).json()["items"]
    made = [(e["action"], e["target"]) for e in trail if e["via"] == "console"]
    assert made == [
        ("task.deleted", "beta"),
        ("task.triggered", "alpha"),
        ("task.created", "alpha-copy"),
        ("task.updated", "beta"),
        ("task.updated", "alpha"),
    ]
    assert {e["source"] for e in trail if e["via"] == "console"} == {"127.0.0.1"}


def test_the_task_list_filters_by_tags_and_the_form_sets_them(console: Api) -> None:
    new_group(console)
    new_task(console, name="alpha", tags=["billing", "nightly"])
    new_task(console, name="beta", tags=["billing"])
    new_task(console, name="gamma")
    with signed_in(console) as (client, csrf):

        def listed(tag: str) -> list[str]:
            answer = client.get("/tasks", params={"tag": tag}, headers={"HX-Request": "true"})
            assert answer.status_code == 200, answer.text
            return re.findall(r'<a href="/tasks/\d+">([^<]+)</a>', answer.text)

        assert listed("billing") == ["alpha", "beta"]
        assert listed("Billing, nightly") == ["alpha"]  # every tag typed, lowercased
        assert listed("") == ["alpha", "beta", "gamma"]
        whole = client.get("/tasks").text
        assert '<a class="tag" href="/tasks?tag=nightly">nightly</a>' in whole
        bad = client.get("/tasks", params={"tag": "no/slash"})
        assert bad.status_code == 200
        assert "1-32 lowercase" in field_errors(bad.text)["tag"]
        assert 'value="no/slash"' in bad.text

        refused = client.post("/tasks/new", data=task_form(csrf, name="delta", tags="ok, a/b"))
        assert refused.status_code == 422
        assert "tags.1: 'a/b' is not valid" in html.unescape(field_errors(refused.text)["tags"])
        assert 'value="ok, a/b"' in refused.text
        created = client.post("/tasks/new", data=task_form(csrf, name="delta", tags="ops ,db"))
        assert created.status_code == 303, created.text
        delta = console.client.get("/tasks", params={"name": "delta"}).json()["items"][0]
        assert delta["tags"] == ["db", "ops"]
        edit = client.get(f"/tasks/{delta['id']}/edit")
        assert 'value="db, ops"' in edit.text
        shown = client.get(f"/tasks/{delta['id']}")
        assert '<a class="tag" href="/tasks?tag=ops">ops</a>' in shown.text
        saved = client.post(f"/tasks/{delta['id']}/edit", data=task_form(csrf, name="delta"))
        assert saved.status_code == 303
        assert console.client.get(f"/tasks/{delta['id']}").json()["tags"] == []


def test_the_slot_view_shows_missed_slots_and_the_ranges_not_fired(
    console: Api, sessions: sessionmaker[Session]
) -> None:
    new_group(console)
    task = new_task(console, schedule="0 * * * * *")["id"]
    now = utcnow().replace(second=0, microsecond=0)
    first, end = now - timedelta(minutes=30), now - timedelta(minutes=20)
    with sessions() as session:
        session.execute(
            update(Task).where(Task.id == task).values(created_at=now - timedelta(hours=2))
        )
        session.add(
            SlotMiss(
                task_id=task,
                first_at=first,
                end_at=end,
                slot_count=10,
                reason="missed",
                manager_id="10.0.0.1:18080",
                recorded_at=end,
            )
        )
        session.commit()
    with signed_in(console) as (client, _):
        page = client.get("/slots", params={"task_id": task})
    assert page.status_code == 200, page.text
    badges = page.text.count('<span class="badge o-missed">missed</span>')
    assert badges == 10 + 2  # the slots, their count's card, the range
    assert "Slots not fired" in page.text and "10 slot(s) from" in page.text


ENV_ALERTS = AlertSettings.model_validate(
    {
        "channels": [{"name": "env-hook", "type": "webhook", "url": "http://127.0.0.1:9/env"}],
        "rules": [{"name": "env-failed", "when": "run_failed", "channels": ["env-hook"]}],
    }
)
CONSOLE_SECRET = "console-typed-secret"


def test_the_alerts_page_makes_edits_silences_and_deletes_a_policy_with_errors_at_their_field(
    sessions: sessionmaker[Session],
) -> None:
    with served_api(sessions, alerts=ENV_ALERTS) as console, signed_in(console) as (client, csrf):
        listed = client.get("/alerts")
        assert listed.status_code == 200, listed.text
        assert "env-failed" in listed.text and "env file (read-only)" in listed.text
        # A bad channel: its field says why, what was typed stays, the secret is not echoed.
        channel = {"csrf_token": csrf, "name": "ops", "type": "webhook", "url": "ftp://x"}
        channel |= {"format": "ays", "secret": CONSOLE_SECRET}
        bad = client.post("/alerts/channels", data=channel)
        assert bad.status_code == 422, bad.text
        assert "url" in field_errors(bad.text) and 'value="ftp://x"' in bad.text
        assert CONSOLE_SECRET not in bad.text
        made = client.post("/alerts/channels", data=channel | {"url": "http://127.0.0.1:9/ops"})
        assert made.status_code == 303, made.text
        with sessions() as session:
            assert session.query(AlertChannelRow).one().secret == CONSOLE_SECRET
        edit = client.get("/alerts/channels/ops/edit")
        assert CONSOLE_SECRET not in edit.text and "leave empty to keep it" in edit.text
        # A bad rule: no channel ticked, a count that is no number.
        rule = {"csrf_token": csrf, "name": "slow", "when": "running_longer_than"}
        rule |= {"tasks": "", "node_groups": "", "count": "many", "seconds": "", "factor": ""}
        rule |= {"history": "", "recovery": "on"}
        bad = client.post("/alerts/rules", data=rule)
        assert bad.status_code == 422, bad.text
        assert set(field_errors(bad.text)) == {"count", "channels"}, field_errors(bad.text)
        made = client.post(
            "/alerts/rules", data=rule | {"count": "", "factor": "3", "channels": ["ops"]}
        )
        assert made.status_code == 303, made.text
        assert client.get("/alerts/rules/env-failed/edit").status_code == 409
        saved = client.post(
            "/alerts/rules/slow",
            data=rule | {"count": "", "seconds": "600", "channels": ["ops", "env-hook"]},
        )
        assert saved.status_code == 303, saved.text
        shown = console.client.get("/alerts/rules").json()["rules"]
        slow = next(r for r in shown if r["name"] == "slow")
        assert slow["seconds"] == 600 and slow["channels"] == ["ops", "env-hook"]
        # Silence (an env-file rule too), the test button (htmx), then delete.
        for name in ("slow", "env-failed"):
            quiet = client.post(f"/alerts/rules/{name}/silence", data={"csrf_token": csrf})
            assert quiet.status_code == 303, quiet.text
        shown = console.client.get("/alerts/rules").json()["rules"]
        assert all(r["silenced"] for r in shown)
        htmx = {"X-CSRF-Token": csrf, "HX-Request": "true"}
        tested = client.post("/alerts/channels/ops/test", headers=htmx)
        assert tested.status_code == 200 and "queued" in tested.text, tested.text
        busy = client.post("/alerts/channels/ops/delete", data={"csrf_token": csrf})
        assert busy.status_code == 409 and "slow" in busy.text
        for path in ("/alerts/rules/slow/delete", "/alerts/channels/ops/delete"):
            assert client.post(path, data={"csrf_token": csrf}).status_code == 303
        page = client.get("/alerts").text
        assert "slow" not in page and "test notice from manager" in page
        trail = console.client.get("/audit", params={"limit": 50}).json()["items"]
        alerts = [e for e in trail if e["target_type"].startswith("alert_")]
        assert {e["via"] for e in alerts} == {"console"} and len(alerts) == 7
        assert CONSOLE_SECRET not in str(trail)


def test_a_channel_edit_sent_back_with_an_error_still_says_its_secret_is_kept(
    sessions: sessionmaker[Session],
) -> None:
    with served_api(sessions, alerts=ENV_ALERTS) as console, signed_in(console) as (client, csrf):
        channel = {"csrf_token": csrf, "name": "ops", "type": "webhook", "format": "ays"}
        channel |= {"url": "http://127.0.0.1:9/ops", "secret": CONSOLE_SECRET}
        assert client.post("/alerts/channels", data=channel).status_code == 303
        bad = client.post("/alerts/channels/ops", data=channel | {"url": "ftp://x", "secret": ""})
        assert bad.status_code == 422 and "url" in field_errors(bad.text), bad.text
        assert "set: leave empty to keep it" in bad.text and CONSOLE_SECRET not in bad.text
