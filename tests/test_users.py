"""Users, roles and personal tokens (ays_runtime/users): each role may do what its rule says
and nothing more, route by route over the whole manager API and console; operators only in
their node groups; tokens shown once, stored hashed, refused once revoked; every user and
token change audited; the console signs users in with a password; nodes take only the
cluster secret.

Everything runs against a real manager (and node) on loopback, on SQLite.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from ays_runtime.auth import resolve_cluster_secret
from ays_runtime.config import parse_config
from ays_runtime.exceptions import ConfigError
from ays_runtime.manager.api import create_app
from ays_runtime.manager.context import ManagerContext
from ays_runtime.users import access
from ays_runtime.vocabulary import Role
from tests.daemons import TOKEN, Cluster, client, cluster
from tests.test_manager_api import CONFIG

PASSWORD = "correct horse battery"
PEOPLE = {"ada": Role.ADMIN, "otto": Role.OPERATOR, "vera": Role.VIEWER}
NO_ID = "999999"  # no such task, run, node or token: an allowed write answers 404, not 403


@dataclass
class Users(Cluster):
    tokens: dict[str, str] = field(default_factory=dict)

    def as_user(self, name: str) -> httpx.Client:
        return client(self.manager_port, self.tokens[name])

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.manager_port}"

    @contextmanager
    def console(self, name: str, password: str = PASSWORD) -> Iterator[tuple[httpx.Client, str]]:
        """A browser signed in as `name`, and its CSRF token."""
        with httpx.Client(base_url=self.base, timeout=10) as browser:
            yield self._sign_in(browser, name, password)

    def _sign_in(self, browser: httpx.Client, name: str, password: str) -> tuple[httpx.Client, str]:
        answer = browser.post("/login", data={"username": name, "password": password})
        assert answer.status_code == 303, answer.text
        page = browser.get("/runs")
        found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert found, page.text
        return browser, found.group(1)


@pytest.fixture(scope="module")
def ays(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Users]:
    tmp = tmp_path_factory.mktemp("users")
    with cluster(tmp, Users) as running:
        with running.api() as api:
            assert api.post("/node-groups", json={"name": "g2"}).status_code == 201
            for name, role in PEOPLE.items():
                groups = ["g1"] if role == Role.OPERATOR else []
                body = {"name": name, "role": role, "groups": groups, "password": PASSWORD}
                made = api.post("/users", json=body)
                assert made.status_code == 201, made.text
                token = api.post(f"/users/{name}/tokens", json={"name": "tests"})
                assert token.status_code == 201, token.text
                running.tokens[name] = token.json()["token"]
        yield running


def task_body(name: str, group: str) -> dict[str, Any]:
    return {
        "name": name,
        "node_group": group,
        "schedule": "0 0 3 * * *",
        "task_type": "shell",
        "payload": {"command": "echo hi"},
        "enabled": False,
    }


# --- the table covers every operation -------------------------------------------------------


def console_operations() -> set[tuple[str, str]]:
    """(method, path template) of every route of the manager's app outside its OpenAPI
    document: the console's pages and forms, sign-in, /docs."""
    ctx = ManagerContext(
        config=CONFIG,
        sessions=None,  # type: ignore[arg-type]
        access_token=TOKEN,
        manager_id="127.0.0.1:1",
        on_tasks_changed=None,  # type: ignore[arg-type]
        trigger_now=None,  # type: ignore[arg-type]
        kill_run=None,  # type: ignore[arg-type]
        run_output=None,  # type: ignore[arg-type]
    )
    app = create_app(ctx)
    found: set[tuple[str, str]] = set()

    def add(route: Any, path: str) -> None:
        if getattr(route, "include_in_schema", True) and path.startswith("/api/"):
            return  # in the OpenAPI document
        for method in getattr(route, "methods", None) or ():
            if method != "HEAD" and path != "/openapi.json":
                found.add((method, path))

    for route in app.routes:
        if hasattr(route, "effective_route_contexts"):  # an included router (FastAPI >= 0.16x)
            for context in route.effective_route_contexts():
                add(context.original_route, context.path_format)
        elif isinstance(route, Route):
            add(route, route.path_format)
    return found


def api_operations(ays: Users) -> set[tuple[str, str]]:
    document = httpx.get(f"{ays.base}/openapi.json", timeout=10).json()
    return {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }


def sample(path: str) -> str:
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: "no-such" if m.group(1) == "name" else NO_ID, path)


def test_every_operation_of_the_api_and_console_has_an_access_rule(ays: Users) -> None:
    operations = api_operations(ays) | console_operations()
    assert len(operations) > 80
    missing = sorted(op for op in operations if access.rule_of(op[0], sample(op[1])) is None)
    assert not missing, f"add these to ays_runtime/users/access.py RULES: {missing}"


def allowed(role: Role, rule: access.Rule) -> bool:
    return rule.public or (rule.least is not None and role.rank >= rule.least.rank)


@pytest.mark.parametrize("name", list(PEOPLE))
def test_each_role_may_call_what_its_rule_allows_and_gets_403_for_the_rest(
    ays: Users, name: str
) -> None:
    role = PEOPLE[name]
    api = httpx.Client(
        base_url=ays.base, timeout=15, headers={"Authorization": f"Bearer {ays.tokens[name]}"}
    )
    # Signing out last: it ends the session the other console calls use.
    operations = sorted(
        api_operations(ays) | console_operations(), key=lambda op: op == ("POST", "/logout")
    )
    wrong: list[str] = []
    refused: set[str] = set()
    with api, ays.console(name) as (browser, csrf):
        for method, template in operations:
            path = sample(template)
            rule = access.rule_of(method, path)
            assert rule is not None
            is_api = path.startswith(("/api/", "/metrics", "/openapi.json"))
            caller = api if is_api else browser
            data = None if is_api or method == "GET" else {"csrf_token": csrf}
            answer = caller.request(method, path, data=data)
            status = answer.status_code
            if rule.public:
                ok = status != 403
            elif allowed(role, rule):
                ok = status not in (401, 403)
            else:
                ok = status == 403
                refused.add(f"{method} {template}")
            if not ok:
                wrong.append(f"{method} {template}: {status} {answer.text[:160]!r}")
    assert not wrong, f"{name} ({role}):\n" + "\n".join(wrong)
    # Only managers and nodes post heartbeats, claims and results: an admin user neither.
    nodes_only = {"POST /api/v1/nodes/heartbeat", "POST /api/v1/job-logs/claims"}
    assert nodes_only <= refused
    if role == Role.ADMIN:
        assert len(refused) == 4, refused
    if role == Role.VIEWER:
        assert {"POST /api/v1/tasks", "POST /tasks/new", "POST /api/v1/users"} <= refused


# --- operators act in their groups only -----------------------------------------------------


def test_an_operator_changes_tasks_and_runs_of_their_groups_only(ays: Users) -> None:
    with ays.api() as env, ays.as_user("otto") as otto, ays.as_user("vera") as vera:
        mine = env.post("/tasks", json=task_body("otto-mine", "g1")).json()
        other = env.post("/tasks", json=task_body("otto-other", "g2")).json()

        refused = otto.patch(f"/tasks/{other['id']}", json={"timeout_s": 5})
        assert refused.status_code == 403
        assert "'g2' is not granted" in refused.json()["error"]
        assert otto.post(f"/tasks/{other['id']}/trigger").status_code == 403
        assert otto.post("/tasks", json=task_body("otto-new", "g2")).status_code == 403
        moved = otto.patch(f"/tasks/{mine['id']}", json={"node_group": "g2"})
        assert moved.status_code == 403

        assert otto.patch(f"/tasks/{mine['id']}", json={"timeout_s": 5}).status_code == 200
        assert otto.post("/tasks", json=task_body("otto-new", "g1")).status_code == 201
        assert vera.patch(f"/tasks/{mine['id']}", json={"timeout_s": 6}).status_code == 403
        assert vera.get(f"/tasks/{other['id']}").status_code == 200

        run = env.post(f"/tasks/{other['id']}/trigger").json()["job_log_id"]
        assert otto.post(f"/job-logs/{run}/kill").status_code == 403
        assert otto.get(f"/job-logs/{run}").status_code == 200

        with ays.console("otto") as (browser, csrf):
            form = {"csrf_token": csrf}
            assert browser.post(f"/tasks/{other['id']}/enable", data=form).status_code == 403
            assert browser.post(f"/tasks/{mine['id']}/enable", data=form).status_code == 303

        audit = env.get("/audit", params={"target": "otto-mine"}).json()["items"]
        assert [(e["who"], e["via"]) for e in audit[:2]] == [("otto", "console"), ("otto", "api")]


def test_an_operator_starts_only_workflows_whose_tasks_are_all_in_their_groups(
    ays: Users,
) -> None:
    with ays.api() as env, ays.as_user("otto") as otto:
        env.post("/tasks", json={**task_body("wf-a", "g1"), "schedule": ""})
        env.post("/tasks", json={**task_body("wf-b", "g2"), "schedule": ""})
        env.post("/tasks", json={**task_body("wf-c", "g1"), "schedule": ""})
        for name, tasks in (("mixed", ["wf-a", "wf-b"]), ("mine", ["wf-c"])):
            made = env.post("/workflows", json={"name": name, "tasks": tasks})
            assert made.status_code == 201, made.text
        assert otto.post("/workflows", json={"name": "x", "tasks": ["wf-c"]}).status_code == 403

        refused = otto.post("/workflows/mixed/start", json={})
        assert refused.status_code == 403 and "'g2' is not granted" in refused.json()["error"]
        started = otto.post("/workflows/mine/start", json={})
        assert started.status_code in (200, 201, 202), started.text
        run_id = started.json()["id"]
        mixed_run = env.post("/workflows/mixed/start", json={}).json()["id"]
        assert otto.post(f"/workflow-runs/{mixed_run}/rerun").status_code == 403
        assert otto.get(f"/workflow-runs/{run_id}").status_code == 200


def test_the_console_hides_the_writes_a_viewer_may_not_make(ays: Users) -> None:
    with ays.api() as env:
        task = env.post("/tasks", json=task_body("shown-to-vera", "g1")).json()
    for name, shown in (("vera", False), ("otto", True)):
        with ays.console(name) as (browser, _):
            page = browser.get(f"/tasks/{task['id']}").text
            assert ("Run now" in page) is shown
            assert (f'action="/tasks/{task["id"]}/delete"' in page or "Delete…" in page) is shown
            assert f"{name} ({PEOPLE[name].value})" in page
            nodes = browser.get("/nodes").text
            assert "Add node" not in nodes and "Create group" not in nodes


def test_the_alerts_pages_show_their_write_controls_to_an_admin_only(ays: Users) -> None:
    hook = {"name": "vera-hook", "type": "webhook", "url": "http://127.0.0.1:9/in"}
    rule = {"name": "vera-rule", "when": "run_failed", "channels": ["vera-hook"]}
    with ays.api() as env:
        assert env.post("/alerts/channels", json=hook).status_code == 201
        assert env.post("/alerts/rules", json=rule).status_code == 201
    controls = (
        'href="/alerts/rules/new"',
        'href="/alerts/channels/new"',
        'href="/alerts/rules/vera-rule/edit"',
        'action="/alerts/rules/vera-rule/silence"',
        'action="/alerts/rules/vera-rule/delete"',
        'action="/alerts/channels/vera-hook/test"',
        'action="/alerts/channels/vera-hook/delete"',
    )
    for name, shown in (("vera", False), ("otto", False), ("ada", True)):
        with ays.console(name) as (browser, csrf_token):
            page = browser.get("/alerts")
            assert page.status_code == 200 and "vera-rule" in page.text and "vera-hook" in page.text
            assert [c in page.text for c in controls] == [shown] * len(controls), name
            form = browser.get("/alerts/rules/vera-rule/edit").text
            assert ("Save rule" in form) is shown and ("Only an admin" in form) is not shown
            if not shown:  # and the write itself is still refused
                refused = browser.post(
                    "/alerts/rules/vera-rule/delete", data={"csrf_token": csrf_token}
                )
                assert refused.status_code == 403, refused.text


# --- tokens ---------------------------------------------------------------------------------


def test_a_token_is_shown_once_listed_without_its_secret_stored_hashed_and_revoked_at_once(
    ays: Users,
) -> None:
    with ays.as_user("vera") as vera:
        made = vera.post("/me/tokens", json={"name": "laptop"})
        assert made.status_code == 201, made.text
        secret, token_id = made.json()["token"], made.json()["id"]
        assert secret.startswith("ays_") and len(secret) >= 40
        assert made.json()["prefix"] == secret[:12]

    with client(ays.manager_port, secret) as laptop:
        assert laptop.get("/me").json() == {
            "name": "vera",
            "kind": "user",
            "role": "viewer",
            "groups": [],
        }
        listed = laptop.get("/me/tokens").json()["items"]
        entry = next(t for t in listed if t["id"] == token_id)
        assert set(entry) == {"id", "name", "prefix", "created_at", "last_used_at"}
        assert entry["last_used_at"] is not None and secret not in str(listed)

        with sqlite3.connect(ays.tmp / "ays.db") as db:
            rows = db.execute("SELECT * FROM ays_user_token").fetchall()
            digests = [r[0] for r in db.execute("SELECT digest FROM ays_user_token")]
            audit = db.execute("SELECT * FROM ays_audit").fetchall()
        assert hashlib.sha256(secret.encode()).hexdigest() in digests
        assert secret not in str(rows) and secret not in str(audit)
        assert PASSWORD not in str(audit)

        assert laptop.delete(f"/me/tokens/{token_id}").status_code == 204
        refused = laptop.get("/me")
        assert refused.status_code == 401  # at once: the very next request

    with ays.api() as env:
        made = env.post("/users/otto/tokens", json={"name": "ci"}).json()
        with client(ays.manager_port, made["token"]) as ci:
            assert ci.get("/tasks").status_code == 200
            assert env.delete(f"/users/otto/tokens/{made['id']}").status_code == 204
            assert ci.get("/tasks").status_code == 401


def test_every_user_and_token_change_is_audited_without_a_secret(ays: Users) -> None:
    with ays.api() as env:
        assert env.post("/users", json={"name": "temp", "role": "viewer"}).status_code == 201
        changed = env.patch("/users/temp", json={"role": "operator", "groups": ["g2"]})
        assert changed.status_code == 200, changed.text
        assert env.patch("/users/temp", json={"password": "another long one"}).status_code == 200
        token = env.post("/users/temp/tokens", json={"name": "x"}).json()
        assert env.delete(f"/users/temp/tokens/{token['id']}").status_code == 204
        assert env.delete("/users/temp").status_code == 204
        assert env.get("/users/temp").status_code == 404
        users = env.get("/audit", params={"target": "temp"}).json()["items"]
        tokens = env.get("/audit", params={"target": "temp/x"}).json()["items"]
    assert [e["action"] for e in users] == [
        "user.deleted",
        "user.updated",
        "user.updated",
        "user.created",
    ]
    assert [e["action"] for e in tokens] == ["token.revoked", "token.created"]
    deleted, password, role, created = users
    assert role["changed_fields"] == ["role", "groups"]
    assert role["before"]["role"] == "viewer" and role["after"]["groups"] == ["g2"]
    assert password["after"]["password_changed"] is True
    assert created["who"] == "token" and deleted["after"] is None
    assert "another long one" not in str(users) and token["token"] not in str(tokens)


def test_bad_user_input_is_a_422_naming_the_field_never_echoing_a_password(ays: Users) -> None:
    with ays.api() as env:
        short = env.post("/users", json={"name": "x1", "role": "viewer", "password": "short1"})
        assert short.status_code == 422 and short.json()["field"] == "password"
        assert "short1" not in short.text
        role = env.post("/users", json={"name": "x2", "role": "root"})
        assert role.status_code == 422 and "role" in role.text
        name = env.post("/users", json={"name": "a b", "role": "viewer"})
        assert name.status_code == 422 and name.json()["field"] == "name"
        twice = env.post("/users", json={"name": "ada", "role": "viewer"})
        assert twice.status_code == 409
        assert env.get("/me/tokens").status_code == 404  # the env token is no user


# --- console sign-in with a password; the dev admin -----------------------------------------


def test_the_dev_env_bootstraps_an_admin_whose_password_file_signs_in(ays: Users) -> None:
    path = ays.tmp / "manager" / "admin_password"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    password = path.read_text().strip()
    assert password not in ays.manager.log()
    assert str(path) in ays.manager.log()
    with httpx.Client(base_url=ays.base, timeout=10) as browser:
        wrong = browser.post("/login", data={"username": "admin", "password": "not it at all"})
        assert wrong.status_code == 401 and "do not match" in wrong.text
        right = browser.post("/login", data={"username": "admin", "password": password})
        assert right.status_code == 303
        assert "admin (admin)" in browser.get("/").text


# --- nodes take only the cluster secret -----------------------------------------------------


def test_a_node_refuses_a_job_sent_with_an_operators_token(ays: Users) -> None:
    job = {"job_log_id": 424242, "task_id": 1, "task_type": "shell", "payload": {}}
    url = f"http://127.0.0.1:{ays.node_port}/api/v1/jobs"
    for token in (ays.tokens["otto"], ays.tokens["ada"], TOKEN):
        refused = httpx.post(url, json=job, headers={"Authorization": f"Bearer {token}"})
        assert refused.status_code == 401
    # ...while the manager reaches it with the cluster secret: a run there succeeds.
    with ays.api() as env:
        task = env.post("/tasks", json=task_body("on-the-node", "g1")).json()
        run = env.post(f"/tasks/{task['id']}/trigger").json()["job_log_id"]
        from tests.daemons import wait_for

        wait_for(
            lambda: env.get(f"/job-logs/{run}").json()["status"] == "succeeded",
            60,
            "the run to succeed",
        )
    with ays.as_user("ada") as ada:
        assert ada.post("/nodes/heartbeat", json={}).status_code == 403


def test_an_env_outside_dev_without_a_cluster_secret_is_a_config_error_naming_it(
    tmp_path: Path,
) -> None:
    config = parse_config(
        {
            "env": "uat",
            "access_token": "an-access-token",
            "storage": {"url": f"sqlite:///{tmp_path / 'x.db'}"},
            "registry": {"backend": "builtin"},
            "transport": {"backend": "builtin"},
        },
        "uat.yaml",
    )
    with pytest.raises(ConfigError) as refused:
        resolve_cluster_secret(config, generate=True)
    assert "field cluster_secret is empty" in str(refused.value)
    assert "AYS_CLUSTER_SECRET" in str(refused.value)


# --- the command line -----------------------------------------------------------------------


def test_the_cli_adds_lists_changes_and_removes_users_and_their_tokens(ays: Users) -> None:
    from tests.test_cli import cli

    def run(*args: str, stdin: str | None = None, **extra: str) -> str:
        done = cli(*args, "--config", str(ays.config), stdin=stdin, **extra)
        assert done.returncode == 0, f"{args}: {done.returncode}\n{done.stdout}{done.stderr}"
        assert "Traceback" not in done.stderr
        return done.stdout

    added = run(
        "user",
        "add",
        "carl",
        "-r",
        "operator",
        "-g",
        "g1",
        "--password-stdin",
        stdin="a long password\n",
    )
    assert "added user carl (operator, groups g1)" in added
    assert "carl" in run("user", "list") and "a long password" not in run("user", "list")
    assert "is now operator, groups g1, g2" in run("user", "set", "carl", "-g", "g1", "-g", "g2")
    run("user", "passwd", "carl", "--password-stdin", stdin="another long password\n")
    with ays.console("carl", "another long password") as (browser, _):
        assert "carl (operator)" in browser.get("/").text

    secret = run("token", "create", "ci", "-u", "carl").strip()
    assert secret.startswith("ays_")
    listed = run("token", "list", "-u", "carl")
    assert "ci" in listed and secret[:12] in listed and secret not in listed
    # the token is the CLI's credential too (AYS_TOKEN): the caller's own tokens
    own = run("token", "list", "--json", AYS_TOKEN=secret)
    token_id = json.loads(own)[0]["id"]
    run("token", "revoke", str(token_id), "-u", "carl")
    refused = cli("token", "list", "--config", str(ays.config), AYS_TOKEN=secret)
    assert refused.returncode == 4 and "refused" in refused.stderr

    short = cli(
        "user",
        "add",
        "dora",
        "-r",
        "viewer",
        "--password-stdin",
        "--config",
        str(ays.config),
        stdin="short\n",
    )
    assert short.returncode == 2 and "password" in short.stderr and "short" not in short.stdout
    assert "removed user carl" in run("user", "remove", "carl")
    gone = cli("user", "remove", "carl", "--config", str(ays.config))
    assert gone.returncode == 3 and "carl" in gone.stderr
