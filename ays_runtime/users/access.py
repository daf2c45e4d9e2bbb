"""Who may call what: the table of every operation of the manager's API and console, and
the one FastAPI dependency (`authorize`, on the whole app) that applies it.

Each operation (HTTP method and route path template, as the app declares it; a request is
matched to it as the router matches routes) has a `Rule`: the least
role that may call it (`Role`: viewer < operator < admin), whether managers and nodes may
call it with the cluster secret, and for an operator which node groups it acts on (`scope`):

    task     the task in the path (and the `node_group` the body moves it to)
    body     the `node_group` the body names (a new task)
    run      the task of the run in the path
    bulk     the tasks ticked in the console's form (`task_id`)
    workflow the tasks of the workflow in the path (`name`), or of its run (`run_id`)

An operator may call a scoped operation only if every group it acts on is granted to them;
what does not exist resolves to no group, so the route answers its own 404. The env's
access token is an admin and the cluster too. An operation missing from the table is
refused (403) and fails tests/test_users.py, which walks the whole table for every role.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from fastapi import HTTPException, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.routing import compile_path

from ays_runtime.auth import Caller
from ays_runtime.storage.models import JobLog, Task, Workflow, WorkflowRun, WorkflowTask
from ays_runtime.vocabulary import Role

V, OP, A = Role.VIEWER, Role.OPERATOR, Role.ADMIN
API = "/api/v1"


@dataclass(frozen=True)
class Rule:
    least: Role | None  # None: no user (only the cluster secret and the env token)
    scope: str = ""  # task, body, run, bulk: the groups an operator's call acts on
    cluster: bool = False  # managers and nodes call it with the cluster secret
    public: bool = False  # no caller at all (the guard's PublicRoutes)


PUBLIC = Rule(None, public=True)
NODES = Rule(None, cluster=True)  # the routes nodes call


def _api(table: dict[tuple[str, str], Rule]) -> dict[tuple[str, str], Rule]:
    return {(method, API + path): rule for (method, path), rule in table.items()}


RULES: dict[tuple[str, str], Rule] = {
    **_api(
        {
            ("GET", "/health"): PUBLIC,
            ("GET", "/tasks"): Rule(V),
            ("POST", "/tasks"): Rule(OP, "body"),
            ("GET", "/tasks/{task_id:int}"): Rule(V),
            ("PUT", "/tasks/{task_id:int}"): Rule(OP, "task"),
            ("PATCH", "/tasks/{task_id:int}"): Rule(OP, "task"),
            ("DELETE", "/tasks/{task_id:int}"): Rule(OP, "task"),
            ("POST", "/tasks/{task_id:int}/enable"): Rule(OP, "task"),
            ("POST", "/tasks/{task_id:int}/disable"): Rule(OP, "task"),
            ("POST", "/tasks/{task_id:int}/trigger"): Rule(OP, "task"),
            ("GET", "/tasks/{task_id:int}/versions"): Rule(V),
            ("POST", "/tasks/{task_id:int}/rollback"): Rule(OP, "task"),
            ("GET", "/tasks/{task_id:int}/slots"): Rule(V),
            ("GET", "/task-versions"): Rule(V),
            ("POST", "/apply"): Rule(A),  # may create, change and prune any group's tasks
            ("GET", "/export"): Rule(V),
            ("POST", "/reconcile"): Rule(A),
            ("GET", "/job-logs"): Rule(V),
            ("GET", "/job-logs/{job_log_id:int}"): Rule(V, cluster=True),  # RocketMQ nodes
            ("GET", "/job-logs/{job_log_id:int}/output"): Rule(V),
            ("GET", "/job-logs/{job_log_id:int}/output/stream"): Rule(V),
            ("POST", "/job-logs/{job_log_id:int}/kill"): Rule(OP, "run"),
            ("POST", "/job-logs/{job_log_id:int}/result"): NODES,
            ("POST", "/job-logs/claims"): NODES,
            ("POST", "/job-logs/results"): NODES,
            ("POST", "/nodes/heartbeat"): NODES,
            ("GET", "/nodes"): Rule(V),
            ("POST", "/nodes"): Rule(A),
            ("DELETE", "/nodes/{node_id:int}"): Rule(A),
            ("GET", "/node-groups"): Rule(V),
            ("POST", "/node-groups"): Rule(A),
            ("GET", "/node-groups/{name}"): Rule(V),
            ("PUT", "/node-groups/{name}"): Rule(A),
            ("DELETE", "/node-groups/{name}"): Rule(A),
            ("GET", "/audit"): Rule(V),
            ("GET", "/overview"): Rule(V),
            ("GET", "/forecast"): Rule(V),
            ("GET", "/forecast/tasks"): Rule(V),
            ("GET", "/alerts/rules"): Rule(V),
            ("GET", "/alerts/deliveries"): Rule(V),
            ("POST", "/alerts/test"): Rule(A),
            # alert policies through the API
            ("POST", "/alerts/rules"): Rule(A),
            ("PUT", "/alerts/rules/{name}"): Rule(A),
            ("DELETE", "/alerts/rules/{name}"): Rule(A),
            ("POST", "/alerts/rules/{name}/silences"): Rule(A),
            ("DELETE", "/alerts/rules/{name}/silences"): Rule(A),
            ("GET", "/alerts/silences"): Rule(V),
            ("GET", "/alerts/channels"): Rule(V),  # their secrets are write-only
            ("POST", "/alerts/channels"): Rule(A),
            ("PUT", "/alerts/channels/{name}"): Rule(A),
            ("DELETE", "/alerts/channels/{name}"): Rule(A),
            ("GET", "/alerts/open"): Rule(V),
            ("POST", "/registry/consul/watch"): Rule(A, cluster=True),
            ("GET", "/managers"): Rule(V),
            ("GET", "/workflows"): Rule(V),
            ("GET", "/workflows/{name}"): Rule(V),
            # A workflow may join tasks of several groups: defining one is an admin's.
            ("POST", "/workflows"): Rule(A),
            ("PATCH", "/workflows/{name}"): Rule(A),
            ("DELETE", "/workflows/{name}"): Rule(A),
            ("POST", "/workflows/{name}/start"): Rule(OP, "workflow"),
            ("GET", "/workflow-runs/{run_id}"): Rule(V),
            ("POST", "/workflow-runs/{run_id}/rerun"): Rule(OP, "workflow"),
            ("GET", "/users"): Rule(A),
            ("POST", "/users"): Rule(A),
            ("GET", "/users/{name}"): Rule(A),
            ("PATCH", "/users/{name}"): Rule(A),
            ("DELETE", "/users/{name}"): Rule(A),
            ("POST", "/users/{name}/unlock"): Rule(A),
            ("GET", "/users/{name}/tokens"): Rule(A),
            ("POST", "/users/{name}/tokens"): Rule(A),
            ("DELETE", "/users/{name}/tokens/{token_id:int}"): Rule(A),
            ("GET", "/me"): Rule(V),
            ("GET", "/me/tokens"): Rule(V),
            ("POST", "/me/tokens"): Rule(V),
            ("DELETE", "/me/tokens/{token_id:int}"): Rule(V),
        }
    ),
    ("GET", "/metrics"): Rule(V, cluster=True),  # Prometheus may scrape with either
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    # the console (ays_runtime/console)
    ("GET", "/login"): PUBLIC,
    ("POST", "/login"): PUBLIC,
    ("GET", "/login/oidc"): PUBLIC,
    ("GET", "/login/oidc/callback"): PUBLIC,
    ("GET", "/favicon.ico"): PUBLIC,
    ("POST", "/logout"): Rule(V),
    ("GET", "/"): Rule(V),
    ("GET", "/forecast"): Rule(V),
    ("GET", "/forecast/cell"): Rule(V),
    ("GET", "/slots"): Rule(V),
    ("GET", "/runs"): Rule(V),
    ("GET", "/runs/{job_log_id:int}"): Rule(V),
    ("GET", "/runs/{job_log_id:int}/output/stream"): Rule(V),
    ("POST", "/runs/{job_log_id:int}/kill"): Rule(OP, "run"),
    ("POST", "/runs/{job_log_id:int}/rerun"): Rule(OP, "run"),
    ("GET", "/tasks"): Rule(V),
    ("POST", "/tasks/bulk"): Rule(OP, "bulk"),
    ("GET", "/tasks/new"): Rule(V),
    ("POST", "/tasks/new"): Rule(OP, "body"),
    ("GET", "/tasks/cron-preview"): Rule(V),
    ("GET", "/tasks/{task_id:int}"): Rule(V),
    ("GET", "/tasks/{task_id:int}/edit"): Rule(V),
    ("POST", "/tasks/{task_id:int}/edit"): Rule(OP, "task"),
    ("GET", "/tasks/{task_id:int}/clone"): Rule(V),
    ("POST", "/tasks/{task_id:int}/enable"): Rule(OP, "task"),
    ("POST", "/tasks/{task_id:int}/disable"): Rule(OP, "task"),
    ("POST", "/tasks/{task_id:int}/trigger"): Rule(OP, "task"),
    ("GET", "/tasks/{task_id:int}/delete"): Rule(V),
    ("POST", "/tasks/{task_id:int}/delete"): Rule(OP, "task"),
    ("GET", "/nodes"): Rule(V),
    ("POST", "/nodes/add"): Rule(A),
    ("POST", "/nodes/{node_id:int}/remove"): Rule(A),
    ("POST", "/groups/add"): Rule(A),
    ("POST", "/groups/{name}/delete"): Rule(A),
    ("GET", "/alerts"): Rule(V),
    ("GET", "/alerts/rules/new"): Rule(V),
    ("GET", "/alerts/rules/{name}/edit"): Rule(V),
    ("POST", "/alerts/rules"): Rule(A),
    ("POST", "/alerts/rules/{name}"): Rule(A),
    ("POST", "/alerts/rules/{name}/delete"): Rule(A),
    ("POST", "/alerts/rules/{name}/silence"): Rule(A),
    ("POST", "/alerts/rules/{name}/unsilence"): Rule(A),
    ("GET", "/alerts/channels/new"): Rule(V),
    ("GET", "/alerts/channels/{name}/edit"): Rule(V),
    ("POST", "/alerts/channels"): Rule(A),
    ("POST", "/alerts/channels/{name}"): Rule(A),
    ("POST", "/alerts/channels/{name}/delete"): Rule(A),
    ("POST", "/alerts/channels/{name}/test"): Rule(A),
    ("GET", "/workflows"): Rule(V),
    ("GET", "/workflows/{name}"): Rule(V),
    ("POST", "/workflows/{name}/start"): Rule(OP, "workflow"),
    ("POST", "/workflow-runs/{run_id:int}/rerun"): Rule(OP, "workflow"),
}


_PATTERNS = [(method, compile_path(path)[0], rule) for (method, path), rule in RULES.items()]


def rule_of(method: str, path: str) -> Rule | None:
    """The rule of the operation a request to `path` is (its route's path template)."""
    method = "GET" if method == "HEAD" else method
    for wanted, pattern, rule in _PATTERNS:
        if wanted == method and pattern.match(path):
            return rule
    return None


def may(caller: Caller, rule: Rule) -> str:
    """ "" if `caller` may call an operation of `rule` (groups aside), else why not."""
    if caller.cluster and rule.cluster:
        return ""
    if rule.least is None:
        return "only managers and nodes call it (with the env's cluster_secret)"
    if not caller.role:
        return "the cluster secret opens only the routes managers and nodes call"
    if Role(caller.role).rank < rule.least.rank:
        return f"it needs the {rule.least.value} role; {caller.name} is a {caller.role}"
    return ""


async def authorize(request: Request) -> None:
    """The app-wide dependency: refuse (403) what the caller's role does not allow."""
    path: str = request.scope["path"]
    rule = rule_of(request.method, path)
    what = f"{request.method} {path}"
    if rule is None:
        raise HTTPException(403, f"{what} has no access rule (ays_runtime/users/access.py)")
    if rule.public:
        return
    caller: Caller | None = getattr(request.state, "caller", None)
    if caller is None:
        # The guard let it through without a credential: the env made it public (GET
        # /metrics with `metrics.public: true`). Every other request has a caller.
        return
    why = may(caller, rule)
    if why:
        raise HTTPException(403, f"{caller.name} may not {what}: {why}")
    if rule.scope and caller.role == Role.OPERATOR:
        groups = await groups_of(request, rule.scope)
        outside = sorted(g for g in groups if g not in caller.groups)
        if outside:
            granted = ", ".join(sorted(caller.groups)) or "none"
            raise HTTPException(
                403,
                f"{caller.name} may not {what}: node group {outside[0]!r} is not granted to "
                f"them (granted: {granted}); an admin grants groups with "
                f"`aysManager user set {caller.name} --group {outside[0]}`",
            )


async def groups_of(request: Request, scope: str) -> set[str]:
    """The node groups an operation acts on (see the module docstring)."""
    groups: set[str] = set()
    params = request.path_params
    body = await _body(request) if scope in ("task", "body", "bulk") else {}
    named = body.get("node_group")
    if isinstance(named, list):
        named = named[0] if named else None
    if isinstance(named, str) and named:
        groups.add(named)
    sessions = request.app.state.ays.sessions

    def lookup() -> set[str]:
        ids = [v for v in params.values() if isinstance(v, int)]
        if any(not 0 < v < 2**63 for v in ids):  # no such row; the route answers 404 / 422
            return set()
        with sessions() as session:
            if scope == "task":
                group = session.scalar(select(Task.node_group).where(Task.id == params["task_id"]))
                return {group} if group else set()
            if scope == "run":
                run = session.get(JobLog, params["job_log_id"])
                if run is None:
                    return set()
                group = session.scalar(select(Task.node_group).where(Task.id == run.task_id))
                return {group or "(a deleted task's)"}
            if scope == "workflow":
                return _workflow_groups(session, params)
            if scope == "bulk":
                ids = [int(v) for v in body.get("task_id", []) if str(v).isdigit()]
                return set(session.scalars(select(Task.node_group).where(Task.id.in_(ids))))
            return set()

    return groups | await run_in_threadpool(lookup)


def _workflow_groups(session: Session, params: dict[str, Any]) -> set[str]:
    """The groups of the tasks of the workflow named in the path, or of the run's."""
    if "name" in params:
        workflow_id = session.scalar(select(Workflow.id).where(Workflow.name == params["name"]))
    else:
        run_id = _int(params.get("run_id"))
        workflow_id = (
            None
            if run_id is None
            else session.scalar(select(WorkflowRun.workflow_id).where(WorkflowRun.id == run_id))
        )
    if workflow_id is None:
        return set()
    members = select(WorkflowTask.task_id).where(WorkflowTask.workflow_id == workflow_id)
    return set(session.scalars(select(Task.node_group).where(Task.id.in_(members))))


def _int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 0 < number < 2**63 else None


async def _body(request: Request) -> dict[str, Any]:
    """The request's body as a mapping (JSON object, or a console form); {} otherwise."""
    raw = await request.body()  # bounded by the guard; kept for the route
    if not raw:
        return {}
    kind = request.headers.get("content-type", "")
    if "application/x-www-form-urlencoded" in kind:
        try:
            return dict(parse_qs(raw.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:
            return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
