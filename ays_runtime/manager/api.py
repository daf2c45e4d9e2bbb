"""The manager's HTTP API (FastAPI), under /api/v1 on the manager's port.

    GET    /api/v1/health                      no token: liveness, manager id, version, uptime
    GET    /api/v1/tasks                       ?node_group ?enabled ?name ?tag (repeated: all)
                                               ?limit ?offset
    POST   /api/v1/tasks                       201 the task
    GET    /api/v1/tasks/{id}
    PUT    /api/v1/tasks/{id}                  any subset of the fields (PATCH alike)
    PATCH  /api/v1/tasks/{id}
    DELETE /api/v1/tasks/{id}                  204
    POST   /api/v1/tasks/{id}/enable
    POST   /api/v1/tasks/{id}/disable
    POST   /api/v1/tasks/{id}/trigger          202 {"job_log_id"}; body {"params"} optional
    GET    /api/v1/tasks/{id}/versions         the task's history, newest first
    POST   /api/v1/tasks/{id}/rollback         body {"version"}: that definition, as a new version
    GET    /api/v1/task-versions               ?name: history by name (deleted tasks' too)
    POST   /api/v1/apply                       ?prune ?dry_run: tasks as code (a TasksDocument)
    GET    /api/v1/export                      ?task_id ?node_group (repeatable): the document
    POST   /api/v1/reconcile                   reconcile now; the actions it took
    GET    /api/v1/job-logs                    ?task_id ?status ?node ?since ?until ?limit ?offset
    GET    /api/v1/job-logs/{id}
    GET    /api/v1/job-logs/{id}/output        ?offset: the run's output (live from its node)
    GET    /api/v1/job-logs/{id}/output/stream ?offset: the same, followed (server-sent events)
    POST   /api/v1/job-logs/{id}/kill          202; body {"reason"} optional
    GET    /api/v1/nodes                       ?node_group ?status ?limit ?offset
    GET    /api/v1/node-groups
    POST   /api/v1/node-groups                 201
    GET    /api/v1/node-groups/{name}
    PUT    /api/v1/node-groups/{name}          new description and/or name
    DELETE /api/v1/node-groups/{name}          204; 409 while tasks use the group
    GET    /api/v1/audit                       ?target_type ?target ?who ?action ?since ?until
                                               ?limit ?offset: the audit trail (ays_runtime.audit)
    GET    /api/v1/managers                    the managers sharing the database, each alive or
                                               not, with the tasks it owns
    GET    /api/v1/overview, /forecast, /forecast/tasks, /tasks/{id}/slots
                                               the console's figures (manager/insight_api.py)
    /api/v1/users, /users/{name}, /users/{name}/tokens, /me, /me/tokens
                                               users and personal tokens (ays_runtime/users)

    GET    /metrics                            Prometheus metrics (ays_runtime/metrics/)

The OpenAPI document (/openapi.json) and its viewer (/docs, from the vendored swagger-ui) are
public: they hold no secret; /metrics too when the env says `metrics.public: true`. The web
console (ays_runtime/console) is mounted at / on the same app: its pages need a console
session (the guard asks its `SessionGate`), never a token.
Every other call needs a credential, as `Authorization: Bearer <token>` or
`X-Ays-Token: <token>`, checked by the guard in front of the app (ays_runtime/web/guard.py)
before any body is read: a user's personal token, the env's access token (an admin), or the
cluster secret (managers and nodes: only the routes nodes call); the routes that need none
are declared in `PUBLIC`. What each caller may do is decided by one table for the whole app
(ays_runtime/users/access.py): 403 names the role or the node group that is missing.
Users and tokens: /api/v1/users, /api/v1/me/tokens (ays_runtime/users/api.py). Bodies are
bounded (`manager.max_body_bytes`; results `manager.max_result_body_bytes`): 413 past it.
Errors are JSON `{"error": ...}`; validation errors (422) also carry `field` and `value`, and
`errors` lists every problem found. Every integer a route takes is bounded and every date-time
it answers carries its time zone (ays_runtime/web/fields.py).

Every change of a task is recorded in its history as made by the user whose token it was;
with the env's access token, by "token", or by the name the caller gives with
`X-Ays-Actor: <name>` (the CLI sends user@host), recorded as "<name> (token)".

Database work runs in the thread pool (`def` endpoints, or `run_in_threadpool`), so the event
loop that fires timers is never blocked. A change is committed first and the manager is told
afterwards (`ctx.on_tasks_changed()`), so it reconciles at once; if telling it fails, the
periodic reconcile tick catches up.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ays_runtime import __version__
from ays_runtime.audit import api as audit_api
from ays_runtime.audit import trail
from ays_runtime.audit.api import Who
from ays_runtime.auth import Caller, authenticate
from ays_runtime.console import app as console
from ays_runtime.dependencies import graph
from ays_runtime.exceptions import (
    ConfigError,
    ConflictError,
    InvalidDocument,
    NotFoundError,
    StorageError,
    ValidationError,
)
from ays_runtime.manager import apply, insight_api, tasks, versions
from ays_runtime.manager.context import ManagerContext
from ays_runtime.manager.schemas import (
    ApplyResult,
    ErrorOut,
    FieldChangeOut,
    Health,
    JobLogOut,
    JobLogPage,
    KillRequest,
    KillResponse,
    NodeGroupCreate,
    NodeGroupList,
    NodeGroupOut,
    NodeGroupUpdate,
    NodeOut,
    NodePage,
    PlanStepOut,
    ReconcileResult,
    RollbackRequest,
    RunOutputOut,
    TaskCreate,
    TaskOut,
    TaskPage,
    TasksDocument,
    TaskUpdate,
    TaskVersionList,
    TaskVersionOut,
    TriggerRequest,
    TriggerResponse,
    field_error,
)
from ays_runtime.manager.versions import Actor
from ays_runtime.metrics import base as metrics
from ays_runtime.metrics import manager as manager_metrics
from ays_runtime.storage.database import in_session, utcnow
from ays_runtime.storage.models import NodeStatus, RunStatus, TaskVersion
from ays_runtime.users import access
from ays_runtime.users import api as users_api
from ays_runtime.users import service as users
from ays_runtime.vocabulary import AuditAction
from ays_runtime.web.fields import Id, Position, UtcIn
from ays_runtime.web.guard import (
    TOKEN_HEADER,
    BodyLimit,
    BodyLimits,
    PublicRoutes,
    allowed_methods,
    protect,
)
from ays_runtime.web.refusals import RefusalLog
from ays_runtime.workflows import api as workflows_api

API_PREFIX = "/api/v1"
# The only routes a caller without a token or console session reaches; every other path is
# guarded: the API by the token, the console's pages by its session. Of the console, only the
# sign-in page and its static assets are public.
PUBLIC = PublicRoutes(
    paths=frozenset(
        {f"{API_PREFIX}/health", "/openapi.json", "/docs", "/docs/oauth2-redirect"}
        | console.PUBLIC_PATHS
    ),
    prefixes=console.PUBLIC_PREFIXES,
)
# Where a node's results arrive (manager/node_api.py): they get manager.max_result_body_bytes.
RESULT_ROUTES = (f"{API_PREFIX}/job-logs/results", f"{API_PREFIX}/job-logs/{{job_log_id}}/result")

log = logging.getLogger("ays.manager.api")

T = TypeVar("T")


# --- plumbing -------------------------------------------------------------------------------


def _context(request: Request) -> ManagerContext:
    ctx: ManagerContext = request.app.state.ays
    return ctx


Ctx = Annotated[ManagerContext, Depends(_context)]


async def _in_session(ctx: ManagerContext, work: Callable[[Session], T]) -> T:
    """Run `work(session)` in the thread pool, in a session of its own; tried again on a
    transient database error (`work` commits what it writes)."""
    return await run_in_threadpool(in_session, ctx.sessions, work, "manager: the API", commit=False)


async def _audit(
    ctx: ManagerContext, who: Actor, action: AuditAction, target: str, what: dict[str, Any]
) -> None:
    """Record an action that is not a stored change (a trigger, a kill) once it was done."""

    await _in_session(ctx, lambda s: trail.record_done(s, who, action, target, what))


async def _tasks_changed(ctx: ManagerContext) -> None:
    try:
        await ctx.on_tasks_changed()
    except Exception:
        # The change is committed; the next reconcile tick installs it.
        log.exception("manager: reconcile after an API change failed; the next tick repairs it")


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "bad or missing access token"},
    422: {"model": ErrorOut, "description": "a field has a bad value (named in the body)"},
    503: {"model": ErrorOut, "description": "the database could not be reached"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut}}
_CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": ErrorOut}}

Limit = Annotated[int, Query(ge=1, le=tasks.MAX_PAGE, description="page size")]
Offset = Annotated[Position, Query(description="rows to skip")]


# --- health ---------------------------------------------------------------------------------

health_router = APIRouter(tags=["health"])


@health_router.get("/health", response_model=Health, responses={503: _ERRORS[503]})
def health(ctx: Ctx) -> Health:
    """Liveness; needs no token."""
    uptime = (utcnow() - ctx.started_at).total_seconds()
    return Health(manager_id=ctx.manager_id, version=ctx.version or __version__, uptime_s=uptime)


# --- tasks ----------------------------------------------------------------------------------

tasks_router = APIRouter(prefix="/tasks", tags=["tasks"], responses=_ERRORS)


@tasks_router.get("", response_model=TaskPage)
def list_tasks(
    ctx: Ctx,
    node_group: str | None = None,
    enabled: bool | None = None,
    name: Annotated[str | None, Query(description="part of the name")] = None,
    tag: Annotated[
        list[str] | None, Query(description="a tag the tasks carry; repeated: every one of them")
    ] = None,
    limit: Limit = tasks.DEFAULT_PAGE,
    offset: Offset = 0,
) -> TaskPage:
    with ctx.sessions() as session:
        items, total = tasks.list_tasks(
            session,
            node_group=node_group,
            enabled=enabled,
            name=name,
            tags=tag or (),
            limit=limit,
            offset=offset,
        )
        return TaskPage(items=[TaskOut.model_validate(t) for t in items], total=total)


def _task_out(session: Any, task: Any) -> TaskOut:
    """A task as the API shows it, with what is wrong with its parents (deleted, disabled)."""
    out = TaskOut.model_validate(task)
    out.after_problems = graph.problems(session, task)
    return out


@tasks_router.post("", response_model=TaskOut, status_code=201, responses=_CONFLICT)
async def create_task(body: TaskCreate, ctx: Ctx, who: Who) -> TaskOut:
    data = body.model_dump(mode="json", exclude_unset=True)
    out = await _in_session(ctx, lambda s: _task_out(s, tasks.create_task(s, data, actor=who)))
    await _tasks_changed(ctx)
    return out


@tasks_router.get("/{task_id:int}", response_model=TaskOut, responses=_NOT_FOUND)
def get_task(task_id: Id, ctx: Ctx) -> TaskOut:
    with ctx.sessions() as session:
        return _task_out(session, tasks.get_task(session, task_id))


@tasks_router.put("/{task_id:int}", response_model=TaskOut, responses={**_NOT_FOUND, **_CONFLICT})
@tasks_router.patch("/{task_id:int}", response_model=TaskOut, responses={**_NOT_FOUND, **_CONFLICT})
async def update_task(task_id: Id, body: TaskUpdate, ctx: Ctx, who: Who) -> TaskOut:
    """Change any subset of the task's fields; the others keep their values."""
    changes = body.model_dump(mode="json", exclude_unset=True)
    out = await _in_session(
        ctx, lambda s: _task_out(s, tasks.update_task(s, task_id, changes, actor=who))
    )
    await _tasks_changed(ctx)
    return out


@tasks_router.delete("/{task_id:int}", status_code=204, responses=_NOT_FOUND)
async def delete_task(task_id: Id, ctx: Ctx, who: Who) -> Response:
    """Delete the task; its history stays readable by name (GET /task-versions?name=)."""
    await _in_session(ctx, lambda s: tasks.delete_task(s, task_id, actor=who))
    await _tasks_changed(ctx)
    return Response(status_code=204)


@tasks_router.post("/{task_id:int}/enable", response_model=TaskOut, responses=_NOT_FOUND)
async def enable_task(task_id: Id, ctx: Ctx, who: Who) -> TaskOut:
    out = await _in_session(
        ctx, lambda s: TaskOut.model_validate(tasks.enable_task(s, task_id, actor=who))
    )
    await _tasks_changed(ctx)
    return out


@tasks_router.post("/{task_id:int}/disable", response_model=TaskOut, responses=_NOT_FOUND)
async def disable_task(task_id: Id, ctx: Ctx, who: Who) -> TaskOut:
    out = await _in_session(
        ctx, lambda s: TaskOut.model_validate(tasks.disable_task(s, task_id, actor=who))
    )
    await _tasks_changed(ctx)
    return out


@tasks_router.post(
    "/{task_id:int}/trigger", response_model=TriggerResponse, status_code=202, responses=_NOT_FOUND
)
async def trigger_task(
    task_id: Id, ctx: Ctx, who: Who, body: TriggerRequest | None = None
) -> TriggerResponse:
    """Fire the task now, outside its schedule (enabled or not); `params` overrides the
    task's params for this run only."""
    task = await _in_session(ctx, lambda s: tasks.get_task(s, task_id))
    params = body.params if body else None
    job_log_id = await ctx.trigger_now(task_id, params)
    fired = {"job_log_id": job_log_id, "params": params}
    await _audit(ctx, who, AuditAction.TASK_TRIGGERED, task.name, fired)
    return TriggerResponse(job_log_id=job_log_id)


def _version_list(rows: list[TaskVersion]) -> TaskVersionList:
    items = [
        TaskVersionOut(
            task_id=row.task_id,
            version=row.version,
            name=row.name,
            change=row.change,
            changed_by=row.changed_by,
            via=row.via,
            changed_at=row.changed_at,
            changed_fields=fields,
            definition=row.definition,
        )
        for row, fields in versions.with_changes(rows)
    ]
    return TaskVersionList(items=items, total=len(items))


@tasks_router.get("/{task_id:int}/versions", response_model=TaskVersionList, responses=_NOT_FOUND)
def task_versions(task_id: Id, ctx: Ctx) -> TaskVersionList:
    """The task's history, newest first: each version's definition, what it changed, who
    changed it, through what and when."""
    with ctx.sessions() as session:
        return _version_list(tasks.task_versions(session, task_id))


@tasks_router.post(
    "/{task_id:int}/rollback", response_model=TaskOut, responses={**_NOT_FOUND, **_CONFLICT}
)
async def rollback_task(task_id: Id, body: RollbackRequest, ctx: Ctx, who: Who) -> TaskOut:
    """Write the definition of an earlier version back, as a new version (via rollback).
    Nothing changes when the task has that definition already."""
    out = await _in_session(
        ctx,
        lambda s: TaskOut.model_validate(tasks.rollback_task(s, task_id, body.version, actor=who)),
    )
    await _tasks_changed(ctx)
    return out


versions_router = APIRouter(prefix="/task-versions", tags=["tasks"], responses=_ERRORS)


@versions_router.get("", response_model=TaskVersionList)
def task_versions_named(
    ctx: Ctx, name: Annotated[str, Query(min_length=1, description="the task's name")]
) -> TaskVersionList:
    """Every version that had this name, newest first, the versions of deleted tasks
    included (their task_id is null)."""
    with ctx.sessions() as session:
        return _version_list(tasks.task_versions_named(session, name))


# --- tasks as code, reconcile --------------------------------------------------------------

code_router = APIRouter(tags=["tasks as code"], responses=_ERRORS)


@code_router.post("/apply", response_model=ApplyResult, responses=_CONFLICT)
async def apply_tasks(
    body: TasksDocument,
    ctx: Ctx,
    who: Who,
    prune: Annotated[
        bool, Query(description="delete the tasks and node groups the document does not name")
    ] = False,
    dry_run: Annotated[bool, Query(description="plan only: change nothing")] = False,
) -> ApplyResult:
    """Make the manager's node groups and tasks match the document, all in one transaction
    (all or nothing), and answer the plan: per group and task create, update (field by
    field), unchanged, delete (with prune). Every bad field of the document is reported (422,
    `errors`, fields like `tasks[2].schedule`) and nothing is changed."""
    document = body.model_dump(mode="json")
    plan = await _in_session(
        ctx,
        lambda s: apply.apply_document(s, document, prune=prune, dry_run=dry_run, actor=who),
    )
    if plan.applied:
        await _tasks_changed(ctx)
    return ApplyResult(
        applied=plan.applied,
        dry_run=dry_run,
        prune=prune,
        steps=[
            PlanStepOut(
                kind=step.kind,
                name=step.name,
                action=step.action.value,
                changes=[FieldChangeOut(field=c.field, old=c.old, new=c.new) for c in step.changes],
            )
            for step in plan.steps
        ],
        created=plan.count(apply.Action.CREATE),
        updated=plan.count(apply.Action.UPDATE),
        deleted=plan.count(apply.Action.DELETE),
        unchanged=plan.count(apply.Action.UNCHANGED),
        kept_node_groups=plan.kept_groups,
        kept_tasks=plan.kept_tasks,
        kept_workflows=plan.kept_workflows,
    )


@code_router.get("/export", response_model=TasksDocument, responses=_NOT_FOUND)
def export_tasks(
    ctx: Ctx,
    task_id: Annotated[list[Id] | None, Query(description="only these tasks")] = None,
    node_group: Annotated[list[str] | None, Query(description="only these groups")] = None,
) -> TasksDocument:
    """The document of the manager's node groups and tasks (or of the tasks and groups
    named, with the groups they run in); each field only when it differs from its default.
    `POST /apply` takes it back unchanged."""
    with ctx.sessions() as session:
        document = apply.export_document(session, task_ids=task_id, node_groups=node_group)
    return TasksDocument.model_validate(document)


@code_router.post("/reconcile", response_model=ReconcileResult)
async def reconcile(ctx: Ctx) -> ReconcileResult:
    """Reconcile this manager's timer list with the tasks now (it also does so on every
    tick and after every change) and answer what it did."""
    if ctx.reconcile is None:
        raise HTTPException(503, "this manager cannot reconcile on request")
    return ReconcileResult(manager_id=ctx.manager_id, actions=await ctx.reconcile())


# --- job logs and nodes ---------------------------------------------------------------------

job_logs_router = APIRouter(prefix="/job-logs", tags=["job logs"], responses=_ERRORS)


@job_logs_router.get("", response_model=JobLogPage)
def list_job_logs(
    ctx: Ctx,
    task_id: Id | None = None,
    status: RunStatus | None = None,
    node: Annotated[str | None, Query(description="ip:port of the node")] = None,
    since: Annotated[
        UtcIn | None, Query(description="created at or after (UTC when no offset is given)")
    ] = None,
    until: Annotated[
        UtcIn | None, Query(description="created before (UTC when no offset is given)")
    ] = None,
    limit: Limit = tasks.DEFAULT_PAGE,
    offset: Offset = 0,
) -> JobLogPage:
    """Job logs, newest first."""
    with ctx.sessions() as session:
        items, total = tasks.list_job_logs(
            session,
            task_id=task_id,
            status=status.value if status else None,
            node=node,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
        )
        return JobLogPage(items=[JobLogOut.model_validate(j) for j in items], total=total)


@job_logs_router.get("/{job_log_id:int}", response_model=JobLogOut, responses=_NOT_FOUND)
def get_job_log(job_log_id: Id, ctx: Ctx) -> JobLogOut:
    with ctx.sessions() as session:
        return JobLogOut.model_validate(tasks.get_job_log(session, job_log_id))


@job_logs_router.get("/{job_log_id:int}/output", response_model=RunOutputOut, responses=_NOT_FOUND)
async def job_log_output(
    job_log_id: Id,
    ctx: Ctx,
    offset: Annotated[Position, Query(description="output position to read from")] = 0,
) -> RunOutputOut:
    """The run's output from `offset` on: live from its node while it runs (and after, while
    the node keeps it), else the excerpt stored in the job log. Ask again from `next`."""
    chunk = await ctx.run_output.read(job_log_id, offset)
    return RunOutputOut.model_validate(asdict(chunk))


@job_logs_router.get(
    "/{job_log_id:int}/output/stream",
    response_class=StreamingResponse,
    responses={
        **_NOT_FOUND,
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "server-sent events until the run has ended: `status` "
            '{"status", "node"} when it changes, `output` {"text", "next"} as the job writes, '
            '`end` {"status", "exit_code", "message"} last',
        },
    },
)
async def job_log_output_stream(
    job_log_id: Id,
    request: Request,
    ctx: Ctx,
    offset: Annotated[Position, Query(description="output position to start from")] = 0,
) -> StreamingResponse:
    """Follow the run's output live (server-sent events) until it ends."""
    await ctx.run_output.read(job_log_id, offset)  # a 404 before the stream starts

    async def events() -> AsyncIterator[str]:
        async for event in ctx.run_output.follow(job_log_id, offset):
            yield event.sse()
            if await request.is_disconnected():
                return

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@job_logs_router.post(
    "/{job_log_id:int}/kill",
    response_model=KillResponse,
    status_code=202,
    responses={**_NOT_FOUND, **_CONFLICT},
)
async def kill_job_log(
    job_log_id: Id, ctx: Ctx, who: Who, body: KillRequest | None = None
) -> KillResponse:
    """End the run wherever it is: a pending run (or a retry waiting its backoff) at once; a
    dispatched or running one on its node, which kills its whole process group and reports it
    killed; one no node holds is marked killed. 409 when it had ended already."""
    reason = body.reason if body else KillRequest().reason
    killed, status, detail = await ctx.kill_run(job_log_id, reason)
    if not killed:
        raise ConflictError(f"{detail} (status {status}): nothing to kill")
    killing = {"reason": reason, "status": status, "detail": detail}
    await _audit(ctx, who, AuditAction.RUN_KILLED, f"run {job_log_id}", killing)
    return KillResponse(job_log_id=job_log_id, killed=True, status=status, detail=detail)


nodes_router = APIRouter(prefix="/nodes", tags=["nodes"], responses=_ERRORS)


@nodes_router.get("", response_model=NodePage)
def list_nodes(
    ctx: Ctx,
    node_group: str | None = None,
    status: NodeStatus | None = None,
    limit: Limit = tasks.DEFAULT_PAGE,
    offset: Offset = 0,
) -> NodePage:
    with ctx.sessions() as session:
        items, total = tasks.list_nodes(
            session,
            node_group=node_group,
            status=status.value if status else None,
            limit=limit,
            offset=offset,
        )
        return NodePage(items=[NodeOut.model_validate(n) for n in items], total=total)


# --- node groups ----------------------------------------------------------------------------

groups_router = APIRouter(prefix="/node-groups", tags=["node groups"], responses=_ERRORS)


@groups_router.get("", response_model=NodeGroupList)
def list_node_groups(ctx: Ctx) -> NodeGroupList:
    with ctx.sessions() as session:
        items = [NodeGroupOut.model_validate(g) for g in tasks.list_node_groups(session)]
        return NodeGroupList(items=items, total=len(items))


@groups_router.post("", response_model=NodeGroupOut, status_code=201, responses=_CONFLICT)
async def create_node_group(body: NodeGroupCreate, ctx: Ctx, who: Who) -> NodeGroupOut:
    data = body.model_dump(mode="json", exclude_unset=True)
    out = await _in_session(
        ctx, lambda s: NodeGroupOut.model_validate(tasks.create_node_group(s, data, actor=who))
    )
    await _tasks_changed(ctx)
    return out


@groups_router.get("/{name}", response_model=NodeGroupOut, responses=_NOT_FOUND)
def get_node_group(name: str, ctx: Ctx) -> NodeGroupOut:
    with ctx.sessions() as session:
        return NodeGroupOut.model_validate(tasks.get_node_group(session, name))


@groups_router.put("/{name}", response_model=NodeGroupOut, responses={**_NOT_FOUND, **_CONFLICT})
async def update_node_group(name: str, body: NodeGroupUpdate, ctx: Ctx, who: Who) -> NodeGroupOut:
    """Change the description and/or rename; the group's tasks and nodes follow a rename."""
    changes = body.model_dump(mode="json", exclude_unset=True)
    out = await _in_session(
        ctx,
        lambda s: NodeGroupOut.model_validate(tasks.update_node_group(s, name, changes, actor=who)),
    )
    await _tasks_changed(ctx)
    return out


@groups_router.delete("/{name}", status_code=204, responses={**_NOT_FOUND, **_CONFLICT})
async def delete_node_group(name: str, ctx: Ctx, who: Who) -> Response:
    """Refused (409) while tasks use the group."""
    await _in_session(ctx, lambda s: tasks.delete_node_group(s, name, actor=who))
    await _tasks_changed(ctx)
    return Response(status_code=204)


# --- errors ---------------------------------------------------------------------------------


def _validation_body(errors: list[ValidationError]) -> dict[str, Any]:
    first = errors[0]
    return {
        "error": "; ".join(str(e) for e in errors),
        "field": first.field,
        "value": _jsonable(first.value),
        "errors": [
            {"field": e.field, "value": _jsonable(e.value), "error": str(e)} for e in errors
        ],
    }


def _jsonable(value: Any) -> Any:
    """The bad value as it is shown back: long text is cut (the body may be a megabyte)."""
    if isinstance(value, str | bytes) and len(value) > 200:
        return f"{value[:160]!s}... ({len(value)} characters)"
    if isinstance(value, dict | list) and len(repr(value)) > 200:
        return f"{repr(value)[:160]}... ({len(repr(value))} characters)"
    try:
        return jsonable_encoder(value)
    except (TypeError, ValueError):
        return repr(value)


async def _on_request_invalid(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [field_error(detail) for detail in exc.errors()]
    return JSONResponse(_validation_body(errors), status_code=422)


async def _on_invalid(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationError)
    errors = exc.errors if isinstance(exc, InvalidDocument) else [exc]
    return JSONResponse(_validation_body(errors), status_code=422)


def _plain(status: int) -> Callable[[Request, Exception], Any]:
    async def handler(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=status)

    return handler


async def _on_storage_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("manager: %s %s failed: %s", request.method, request.url.path, exc)
    return JSONResponse({"error": str(exc)}, status_code=503)


async def _on_database_error(request: Request, exc: Exception) -> JSONResponse:
    # The driver's words only: SQLAlchemy's text carries the statement and its parameters.
    reason = getattr(exc, "orig", None) or type(exc).__name__
    return await _on_storage_error(request, StorageError(f"the database failed: {reason}"))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    detail, headers = exc.detail, exc.headers
    if exc.status_code == 400:  # FastAPI's only one: a body json.loads could not read
        detail = "body: not JSON text (UTF-8); send a JSON object as application/json"
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": allowed_methods(request)}
    return JSONResponse({"error": detail}, status_code=exc.status_code, headers=headers)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the traceback as well; this only keeps the body JSON.
    return JSONResponse(
        {"error": f"internal error in {request.method} {request.url.path}; see the manager log"},
        status_code=500,
    )


# --- the app --------------------------------------------------------------------------------


def create_app(ctx: ManagerContext) -> FastAPI:
    """The API of one running manager; `ctx` is what it needs from the manager."""
    if not ctx.access_token:
        raise ConfigError(
            "manager: the API needs an access token; set access_token in the env file "
            "(in dev the manager generates one on first start)"
        )
    app = FastAPI(
        # Every route, including those added later (alerts, node routes), is decided by the
        # one table of ays_runtime/users/access.py.
        dependencies=[Depends(access.authorize)],
        docs_url=None,  # served by the console from local assets (no CDN)
        redoc_url=None,
        title="Ays manager",
        version=ctx.version or __version__,
        description="Tasks, job logs, nodes and node groups of the Ays scheduling center. "
        f"Send the env's access token as `Authorization: Bearer <token>` or `{TOKEN_HEADER}`.",
    )
    app.state.ays = ctx
    app.include_router(health_router, prefix=API_PREFIX)
    routers = (
        tasks_router,
        versions_router,
        code_router,
        job_logs_router,
        nodes_router,
        groups_router,
        audit_api.router,
        insight_api.router,
        workflows_api.router,
        users_api.router,
    )
    for router in routers:
        app.include_router(router, prefix=API_PREFIX)
    metrics.add_route(app, manager_metrics.REGISTRY)
    settings = ctx.config.manager
    results = BodyLimit(settings.max_result_body_bytes, "manager.max_result_body_bytes")
    token = ctx.access_token

    def user_of(presented: str) -> Caller | None:
        def check(session: Session) -> Caller | None:
            return users.authenticate_token(session, presented)  # it commits the last use

        return in_session(ctx.sessions, check, "manager: a personal token", commit=False)

    async def personal(presented: str) -> Caller | None:
        return await run_in_threadpool(user_of, presented)

    async def caller(headers: Mapping[str, str]) -> Caller | None:
        return await authenticate(headers, token, ctx.cluster_secret, personal)

    gate = console.mount(app, ctx)
    protect(
        app,
        public=metrics.public_routes(PUBLIC, ctx.config),
        sessions=gate,
        authenticate=caller,
        limits=BodyLimits(
            BodyLimit(settings.max_body_bytes, "manager.max_body_bytes"),
            dict.fromkeys(RESULT_ROUTES, results),
        ),
        refusals=RefusalLog(f"manager {ctx.manager_id}", log),
    )
    app.add_exception_handler(RequestValidationError, _on_request_invalid)
    app.add_exception_handler(ValidationError, _on_invalid)
    app.add_exception_handler(NotFoundError, _plain(404))
    app.add_exception_handler(ConflictError, _plain(409))
    app.add_exception_handler(StorageError, _on_storage_error)
    app.add_exception_handler(SQLAlchemyError, _on_database_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    console.html_errors(app, gate)
    return app
