"""Workflows and their runs in the database: definitions, starts, status, reruns.

Plain synchronous functions (a Session for the API's reads and changes, a Connection inside
a transaction for the sweep). Raises ValidationError / NotFoundError / ConflictError
(ays_runtime.exceptions) naming the field or the workflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, func, select, update
from sqlalchemy.orm import Session

from ays_runtime.audit import trail
from ays_runtime.dependencies.triggers import slot_outcomes
from ays_runtime.exceptions import ConflictError, NotFoundError, ValidationError
from ays_runtime.manager.schemas import WorkflowCreate, WorkflowUpdate, validated
from ays_runtime.manager.versions import API_ACTOR, Actor
from ays_runtime.scheduler.firing import Fire
from ays_runtime.scheduler.schedule import parse_schedule
from ays_runtime.storage.database import insert_ignoring_duplicates, utcnow
from ays_runtime.storage.models import (
    JobLog,
    Task,
    TaskEdge,
    Workflow,
    WorkflowRun,
    WorkflowTask,
)
from ays_runtime.vocabulary import AuditAction, RunStatus, TriggerKind, WorkflowRunStatus

_UNFINISHED = (RunStatus.PENDING.value, RunStatus.DISPATCHED.value, RunStatus.RUNNING.value)


# --- definitions ----------------------------------------------------------------------------


def create_workflow(
    session: Session, data: Mapping[str, Any], actor: Actor = API_ACTOR
) -> Workflow:
    spec = validated(WorkflowCreate, data)
    if session.scalar(select(Workflow.id).where(Workflow.name == spec.name)) is not None:
        raise ConflictError(f"name: workflow {spec.name!r} already exists; choose another")
    wf = insert_workflow(session, spec, actor)
    session.commit()
    return wf


def insert_workflow(session: Session, spec: WorkflowCreate, actor: Actor) -> Workflow:
    """Add the workflow `spec` (not committed), recording it in the audit trail."""
    _check_schedule(spec.schedule, spec.timezone)
    now = utcnow()
    wf = Workflow(**spec.model_dump(mode="json", exclude={"tasks"}), created_at=now, updated_at=now)
    session.add(wf)
    session.flush()
    _set_tasks(session, wf, spec.tasks)
    trail.record(session, actor, AuditAction.WORKFLOW_CREATED, wf.name, after=spec_of(spec))
    return wf


def update_workflow(
    session: Session, name: str, changes: Mapping[str, Any], actor: Actor = API_ACTOR
) -> Workflow:
    patch = validated(WorkflowUpdate, changes).model_dump(mode="json", exclude_unset=True)
    wf = get_workflow(session, name)
    spec = validated(WorkflowCreate, {**definition(session, wf), **patch})
    if spec.name != wf.name and session.scalar(
        select(Workflow.id).where(Workflow.name == spec.name)
    ):
        raise ConflictError(f"name: workflow {spec.name!r} already exists; choose another")
    change_workflow(session, wf, spec, actor)
    session.commit()
    return wf


def change_workflow(
    session: Session,
    wf: Workflow,
    spec: WorkflowCreate,
    actor: Actor,
    before: dict[str, Any] | None = None,
) -> None:
    """Make `wf` the workflow `spec` (not committed), recording the change in the audit trail
    (`before`: its definition, when its tasks were already taken from it)."""
    before = before or definition(session, wf)
    _check_schedule(spec.schedule, spec.timezone)
    for key, value in spec.model_dump(mode="json", exclude={"tasks"}).items():
        setattr(wf, key, value)
    wf.updated_at = utcnow()
    _set_tasks(session, wf, spec.tasks)
    trail.record(
        session,
        actor,
        AuditAction.WORKFLOW_UPDATED,
        before["name"],
        before=before,
        after=spec_of(spec),
    )


def delete_workflow(session: Session, name: str, actor: Actor = API_ACTOR) -> None:
    """The workflow goes (its tasks stay, as tasks of no workflow); its runs' rows stay."""
    remove_workflow(session, get_workflow(session, name), actor)
    session.commit()


def remove_workflow(session: Session, wf: Workflow, actor: Actor) -> None:
    """Delete `wf` (not committed): its tasks stay, as tasks of no workflow."""
    trail.record(
        session, actor, AuditAction.WORKFLOW_DELETED, wf.name, before=definition(session, wf)
    )
    session.execute(delete(WorkflowTask).where(WorkflowTask.workflow_id == wf.id))
    session.delete(wf)


def get_workflow(session: Session, name: str) -> Workflow:
    wf = session.scalar(select(Workflow).where(Workflow.name == name))
    if wf is None:
        raise NotFoundError(f"workflow {name!r} does not exist (see: aysManager workflow list)")
    return wf


def list_workflows(session: Session) -> list[Workflow]:
    return list(session.scalars(select(Workflow).order_by(Workflow.name)))


def task_names(session: Session | Connection, workflow_id: int) -> list[str]:
    return list(
        session.execute(
            select(Task.name)
            .join(WorkflowTask, WorkflowTask.task_id == Task.id)
            .where(WorkflowTask.workflow_id == workflow_id)
            .order_by(Task.name)
        ).scalars()
    )


def definition(session: Session, wf: Workflow) -> dict[str, Any]:
    return {
        "name": wf.name,
        "description": wf.description,
        "tasks": task_names(session, wf.id),
        "schedule": wf.schedule,
        "timezone": wf.timezone,
        "params": wf.params,
        "timeout_s": wf.timeout_s,
        "enabled": wf.enabled,
    }


def spec_of(spec: WorkflowCreate) -> dict[str, Any]:
    return spec.model_dump(mode="json")


def _check_schedule(schedule: str, timezone: str) -> None:
    if schedule:
        parse_schedule(schedule, timezone)  # names `schedule` or `timezone`


def _set_tasks(session: Session, wf: Workflow, names: Sequence[str]) -> None:
    found = dict(session.execute(select(Task.name, Task.id).where(Task.name.in_(names))).all())
    missing = [n for n in names if n not in found]
    if missing:
        raise ValidationError("tasks", missing, "names of existing tasks; create them first")
    taken = session.execute(
        select(Task.name, Workflow.name)
        .join(WorkflowTask, WorkflowTask.task_id == Task.id)
        .join(Workflow, Workflow.id == WorkflowTask.workflow_id)
        .where(Task.name.in_(names), Workflow.id != wf.id)
    ).all()
    if taken:
        task, other = taken[0]
        raise ValidationError(
            "tasks", task, f"a task of no other workflow; {task!r} is in workflow {other!r}"
        )
    session.execute(delete(WorkflowTask).where(WorkflowTask.workflow_id == wf.id))
    session.add_all(WorkflowTask(workflow_id=wf.id, task_id=found[n]) for n in names)
    session.flush()


# --- the graph ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Graph:
    """A workflow's tasks (id -> name, enabled) and its edges inside it (child -> parents)."""

    names: dict[int, str]
    enabled: dict[int, bool]
    parents: dict[int, list[int]]

    @property
    def roots(self) -> list[int]:
        return sorted(t for t in self.names if not self.parents.get(t))

    def layers(self) -> list[list[int]]:
        """The tasks by depth (a root is at 0; a child one below its deepest parent)."""
        depth: dict[int, int] = {}

        def of(task: int, seen: frozenset[int] = frozenset()) -> int:
            if task not in depth:
                ps = [p for p in self.parents.get(task, []) if p not in seen]
                depth[task] = 1 + max((of(p, seen | {task}) for p in ps), default=-1)
            return depth[task]

        for task in self.names:
            of(task)
        out: list[list[int]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
        for task, d in sorted(depth.items(), key=lambda kv: self.names[kv[0]]):
            out[d].append(task)
        return out


def graph(conn: Session | Connection, workflow_id: int) -> Graph:
    rows = conn.execute(
        select(Task.id, Task.name, Task.enabled)
        .join(WorkflowTask, WorkflowTask.task_id == Task.id)
        .where(WorkflowTask.workflow_id == workflow_id)
    ).all()
    names = {r.id: r.name for r in rows}
    by_name = {r.name: r.id for r in rows}
    parents: dict[int, list[int]] = {}
    if names:
        for child, parent in conn.execute(
            select(TaskEdge.child_id, TaskEdge.parent_name).where(
                TaskEdge.child_id.in_(names), TaskEdge.parent_name.in_(by_name)
            )
        ):
            parents.setdefault(child, []).append(by_name[parent])
    return Graph(names, {r.id: bool(r.enabled) for r in rows}, parents)


# --- runs -----------------------------------------------------------------------------------


def start_run(
    conn: Connection,
    wf: Any,
    at: datetime,
    trigger: str,
    params: str | None,
    manager_id: str,
) -> tuple[int | None, list[Fire]]:
    """Insert the run of `wf` for slot `at` (unless one exists: then (None, [])); its id and
    the fires of its first tasks."""
    now = utcnow()
    row = {
        "workflow_id": wf.id,
        "scheduled_at": at,
        "trigger": trigger,
        "params": wf.params if params is None else params,
        "status": WorkflowRunStatus.RUNNING.value,
        "message": "",
        "manager_id": manager_id,
        "started_at": now,
        "deadline_at": now + timedelta(seconds=wf.timeout_s) if wf.timeout_s else None,
        "ended_at": None,
    }
    before = conn.execute(
        select(WorkflowRun.id).where(
            WorkflowRun.workflow_id == wf.id, WorkflowRun.scheduled_at == at
        )
    ).scalar()
    if before is not None:
        return None, []
    insert_ignoring_duplicates(conn, WorkflowRun, [row], keep="manager_id")
    run = conn.execute(
        select(WorkflowRun.id, WorkflowRun.manager_id, WorkflowRun.started_at).where(
            WorkflowRun.workflow_id == wf.id, WorkflowRun.scheduled_at == at
        )
    ).first()
    if run is None or run.manager_id != manager_id or run.started_at != now:
        return None, []  # another manager started this slot
    return run.id, missing_roots(conn, run.id)


def missing_roots(conn: Connection, run_id: int) -> list[Fire]:
    """The fires of the run's enabled first tasks that have no row for its slot yet."""
    run = _run(conn, run_id)
    g = graph(conn, run.workflow_id)
    roots = [t for t in g.roots if g.enabled[t]]
    if not roots:
        return []
    fired = set(
        conn.execute(
            select(JobLog.task_id).where(
                JobLog.task_id.in_(roots), JobLog.scheduled_at == run.scheduled_at
            )
        ).scalars()
    )
    return [
        Fire(t, run.scheduled_at, TriggerKind.WORKFLOW.value, run.params)
        for t in roots
        if t not in fired
    ]


def _run(conn: Session | Connection, run_id: int) -> Any:
    run = conn.execute(select(WorkflowRun).where(WorkflowRun.id == run_id)).first()
    if run is None:
        raise NotFoundError(f"workflow run {run_id} does not exist")
    return run[0] if isinstance(conn, Session) else run


@dataclass(frozen=True)
class NodeState:
    task_id: int
    name: str
    status: str  # the last attempt's run status, or "not_run"
    job_log_id: int | None
    attempt: int | None
    node: str
    message: str


def node_states(conn: Session | Connection, g: Graph, at: datetime) -> dict[int, NodeState]:
    """Each task's last attempt for slot `at` (shard 0)."""
    rows = conn.execute(
        select(
            JobLog.id, JobLog.task_id, JobLog.attempt, JobLog.status, JobLog.node, JobLog.message
        )
        .where(
            JobLog.task_id.in_(list(g.names)),
            JobLog.scheduled_at == at,
            JobLog.shard_index == 0,
        )
        .order_by(JobLog.attempt)
    ).all()
    out = {t: NodeState(t, g.names[t], "not_run", None, None, "", "") for t in g.names}
    for r in rows:
        out[r.task_id] = NodeState(
            r.task_id, g.names[r.task_id], r.status, r.id, r.attempt, r.node, r.message
        )
    return out


def status_of(conn: Session | Connection, g: Graph, at: datetime) -> str:
    """The run's status as the job log says (see the package docstring)."""
    states = node_states(conn, g, at)
    if any(s.status in _UNFINISHED for s in states.values()):
        return WorkflowRunStatus.RUNNING.value
    if any(states[t].status == "not_run" for t in g.roots if g.enabled[t]):
        return WorkflowRunStatus.RUNNING.value
    outcomes = slot_outcomes(conn, list(g.names), at, lock=False)  # type: ignore[arg-type]
    if any(o == "failure" for o in outcomes.values()):
        return WorkflowRunStatus.FAILED.value
    if all(o == "success" for o in outcomes.values()):
        return WorkflowRunStatus.SUCCEEDED.value
    return WorkflowRunStatus.PARTLY_SKIPPED.value


def settle(conn: Connection, run_id: int, now: datetime) -> tuple[str, list[int]]:
    """Write the running run's status when it has settled; (its status, the unfinished job
    ids to kill when it timed out)."""
    run = _run(conn, run_id)
    g = graph(conn, run.workflow_id)
    status = status_of(conn, g, run.scheduled_at)
    if status == WorkflowRunStatus.RUNNING.value:
        if run.deadline_at is None or run.deadline_at > now:
            return status, []
        timeout = (run.deadline_at - run.started_at).total_seconds()
        unfinished = [
            s.job_log_id
            for s in node_states(conn, g, run.scheduled_at).values()
            if s.status in _UNFINISHED and s.job_log_id is not None
        ]
        _end(conn, run_id, WorkflowRunStatus.FAILED.value, f"timed out after {timeout:g}s", now)
        return WorkflowRunStatus.FAILED.value, unfinished
    _end(conn, run_id, status, "", now)
    return status, []


def _end(conn: Connection, run_id: int, status: str, message: str, now: datetime) -> None:
    conn.execute(
        update(WorkflowRun)
        .where(WorkflowRun.id == run_id, WorkflowRun.status == WorkflowRunStatus.RUNNING.value)
        .values(status=status, message=message, ended_at=now)
    )


def running_runs(conn: Connection) -> list[int]:
    return list(
        conn.execute(
            select(WorkflowRun.id).where(WorkflowRun.status == WorkflowRunStatus.RUNNING.value)
        ).scalars()
    )


def rerun_fires(conn: Connection, run_id: int) -> list[Fire]:
    """Make a failed run run again from its failed tasks: their next attempts' fires."""
    run = _run(conn, run_id)
    if run.status != WorkflowRunStatus.FAILED.value:
        raise ConflictError(f"workflow run {run_id} is {run.status}: only a failed run is rerun")
    g = graph(conn, run.workflow_id)
    states = node_states(conn, g, run.scheduled_at)
    outcomes = slot_outcomes(conn, list(g.names), run.scheduled_at, lock=False)
    failed = [t for t, o in outcomes.items() if o == "failure"]
    if not failed:
        raise ConflictError(f"workflow run {run_id} has no failed task to rerun")
    now = utcnow()
    deadline = None
    if run.deadline_at is not None:
        deadline = now + (run.deadline_at - run.started_at)
    conn.execute(
        update(WorkflowRun)
        .where(WorkflowRun.id == run_id)
        .values(
            status=WorkflowRunStatus.RUNNING.value,
            message=f"rerun from {', '.join(sorted(g.names[t] for t in failed))}",
            started_at=now,
            deadline_at=deadline,
            ended_at=None,
        )
    )
    return [
        Fire(
            t,
            run.scheduled_at,
            TriggerKind.RERUN.value,
            run.params,
            attempt=(states[t].attempt or 0) + 1,
        )
        for t in failed
    ]


def runs_of(session: Session, workflow_id: int, limit: int = 20) -> list[WorkflowRun]:
    return list(
        session.scalars(
            select(WorkflowRun)
            .where(WorkflowRun.workflow_id == workflow_id)
            .order_by(WorkflowRun.scheduled_at.desc(), WorkflowRun.id.desc())
            .limit(limit)
        )
    )


def count_runs(session: Session, workflow_id: int) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(WorkflowRun)
            .where(WorkflowRun.workflow_id == workflow_id)
        )
        or 0
    )


def get_run(session: Session, run_id: int) -> WorkflowRun:
    run = session.get(WorkflowRun, run_id)
    if run is None:
        raise NotFoundError(f"workflow run {run_id} does not exist")
    return run
