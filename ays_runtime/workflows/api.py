"""The workflow routes (included by manager/api.py under /api/v1, behind its token guard and
error handlers: a ValidationError is a 422 naming the field, NotFoundError a 404,
ConflictError a 409). They read the request and call `store` / `service`.

    GET    /workflows                  every workflow
    POST   /workflows                  create one (WorkflowCreate)
    GET    /workflows/{name}           it, its latest run (each task's state) and its runs
    PATCH  /workflows/{name}           change it
    DELETE /workflows/{name}           delete it (its tasks stay)
    POST   /workflows/{name}/start     start it now, by hand ({params?})
    GET    /workflow-runs/{id}         one run, each task's state
    POST   /workflow-runs/{id}/rerun   rerun a failed run from its failed tasks on
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ays_runtime.audit import trail
from ays_runtime.audit.api import Who
from ays_runtime.exceptions import ConflictError
from ays_runtime.manager.context import ManagerContext
from ays_runtime.manager.schemas import (
    ErrorOut,
    WorkflowCreate,
    WorkflowNodeOut,
    WorkflowOut,
    WorkflowRunOut,
    WorkflowStart,
    WorkflowUpdate,
    WorkflowView,
)
from ays_runtime.storage.database import in_session
from ays_runtime.storage.models import Workflow, WorkflowRun
from ays_runtime.vocabulary import AuditAction
from ays_runtime.web.fields import Id
from ays_runtime.workflows import store

RUNS_SHOWN = 20

T = TypeVar("T")


def _sessions(request: Request) -> Iterator[Session]:
    ctx: ManagerContext = request.app.state.ays
    with ctx.sessions() as session:
        yield session


def _context(request: Request) -> ManagerContext:
    ctx: ManagerContext = request.app.state.ays
    return ctx


DbSession = Annotated[Session, Depends(_sessions)]
Ctx = Annotated[ManagerContext, Depends(_context)]

router = APIRouter(
    tags=["workflows"],
    responses={
        401: {"model": ErrorOut, "description": "bad or missing access token"},
        404: {"model": ErrorOut},
        409: {"model": ErrorOut},
        422: {"model": ErrorOut, "description": "a field has a bad value (named in the body)"},
    },
)


def workflow_out(session: Session, wf: Workflow) -> WorkflowOut:
    return WorkflowOut(
        **store.definition(session, wf),
        id=wf.id,
        created_at=wf.created_at,
        updated_at=wf.updated_at,
    )


def run_out(session: Session, run: WorkflowRun, name: str, nodes: bool) -> WorkflowRunOut:
    out = WorkflowRunOut(
        id=run.id,
        workflow=name,
        scheduled_at=run.scheduled_at,
        trigger=run.trigger,
        params=run.params,
        status=run.status,
        message=run.message,
        started_at=run.started_at,
        deadline_at=run.deadline_at,
        ended_at=run.ended_at,
    )
    if nodes:
        g = store.graph(session, run.workflow_id)
        states = store.node_states(session, g, run.scheduled_at)
        for depth, layer in enumerate(g.layers()):
            for task in layer:
                s = states[task]
                out.nodes.append(
                    WorkflowNodeOut(
                        task=s.name,
                        task_id=task,
                        depth=depth,
                        parents=sorted(g.names[p] for p in g.parents.get(task, [])),
                        status=s.status,
                        job_log_id=s.job_log_id,
                        attempt=s.attempt,
                        node=s.node,
                        message=s.message,
                    )
                )
    return out


def view(session: Session, wf: Workflow) -> WorkflowView:
    runs = store.runs_of(session, wf.id, RUNS_SHOWN)
    return WorkflowView(
        workflow=workflow_out(session, wf),
        latest_run=run_out(session, runs[0], wf.name, nodes=True) if runs else None,
        runs=[run_out(session, r, wf.name, nodes=False) for r in runs],
    )


@router.get("/workflows", response_model=list[WorkflowOut])
def list_workflows(session: DbSession) -> list[WorkflowOut]:
    return [workflow_out(session, wf) for wf in store.list_workflows(session)]


def _write(ctx: ManagerContext, work: Callable[[Session], T]) -> T:
    """`work(session)` (it commits what it writes), tried again on a transient database error.
    Blocking: the routes that write are plain functions, run in the thread pool."""
    return in_session(ctx.sessions, work, "manager: the workflows API", commit=False)


@router.post("/workflows", response_model=WorkflowOut, status_code=201)
def create_workflow(body: WorkflowCreate, ctx: Ctx, who: Who) -> WorkflowOut:
    data = body.model_dump(mode="json", exclude_unset=True)
    return _write(ctx, lambda s: workflow_out(s, store.create_workflow(s, data, who)))


@router.get("/workflows/{name}", response_model=WorkflowView)
def get_workflow(name: str, session: DbSession) -> WorkflowView:
    return view(session, store.get_workflow(session, name))


@router.patch("/workflows/{name}", response_model=WorkflowOut)
def update_workflow(name: str, body: WorkflowUpdate, ctx: Ctx, who: Who) -> WorkflowOut:
    changes = body.model_dump(mode="json", exclude_unset=True)
    return _write(ctx, lambda s: workflow_out(s, store.update_workflow(s, name, changes, who)))


@router.delete("/workflows/{name}", status_code=204)
def delete_workflow(name: str, ctx: Ctx, who: Who) -> None:
    _write(ctx, lambda s: store.delete_workflow(s, name, who))


@router.post("/workflows/{name}/start", response_model=WorkflowRunOut, status_code=202)
async def start_workflow(name: str, body: WorkflowStart, ctx: Ctx, who: Who) -> WorkflowRunOut:
    run_id = await _service(ctx).start(name, body.params)
    done = {"run": run_id, "params": body.params}

    def record(session: Session) -> WorkflowRunOut:
        trail.record_done(session, who, AuditAction.WORKFLOW_STARTED, name, done)
        return run_out(session, store.get_run(session, run_id), name, nodes=True)

    return await run_in_threadpool(_write, ctx, record)


@router.get("/workflow-runs/{run_id}", response_model=WorkflowRunOut)
def get_run(run_id: Id, session: DbSession) -> WorkflowRunOut:
    run = store.get_run(session, run_id)
    name = session.get(Workflow, run.workflow_id)
    return run_out(session, run, name.name if name else f"(deleted {run.workflow_id})", True)


@router.post("/workflow-runs/{run_id}/rerun", response_model=WorkflowRunOut, status_code=202)
async def rerun(run_id: Id, ctx: Ctx, who: Who) -> WorkflowRunOut:
    await _service(ctx).rerun(run_id)

    def record(session: Session) -> WorkflowRunOut:
        run = store.get_run(session, run_id)
        wf = session.get(Workflow, run.workflow_id)
        what = {"run": run_id, "message": run.message}
        trail.record_done(session, who, AuditAction.WORKFLOW_RERUN, wf.name if wf else "", what)
        return run_out(session, run, wf.name if wf else "", nodes=True)

    return await run_in_threadpool(_write, ctx, record)


def _service(ctx: ManagerContext) -> Any:
    if ctx.workflows is None:
        raise ConflictError("this manager does not run workflows")
    return ctx.workflows
