"""Task history: every change of a task keeps a version of its definition, with who made the
change, through what (`ChangeVia`: api, console, apply, rollback) and when.

The task service functions (`ays_runtime.manager.tasks`) write the rows in the change's own
transaction, so every caller records them and a change is never stored without its version.
A row holds the task's whole definition after the change (the fields of `TaskCreate`), so the
previous definition of any change is the row before it, and a rollback writes a stored
definition back as a new version.

Deleting a task keeps its history: one more row (change `deleted`) holds what was deleted,
and the rows lose their `task_id` (a database may give the id to a new task); they stay
readable by the task's name (`versions_named`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ays_runtime.audit import trail
from ays_runtime.exceptions import NotFoundError
from ays_runtime.manager.schemas import TaskCreate
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import Task, TaskVersion
from ays_runtime.vocabulary import AuditAction, ChangeVia, TaskChange

WHO_MAX = 128  # TaskVersion.changed_by


@dataclass(frozen=True)
class Actor:
    """Who changes a task, through what, and from where (the caller's address, for the
    audit trail). Until Ays has users, an API caller is "token" (the shared access token),
    or the name it gives with the token (`name (token)`)."""

    who: str = "token"
    via: ChangeVia = ChangeVia.API
    source: str = ""

    def through(self, via: ChangeVia) -> Actor:
        return replace(self, via=via)


API_ACTOR = Actor()
_AUDITED = {
    TaskChange.CREATED: AuditAction.TASK_CREATED,
    TaskChange.UPDATED: AuditAction.TASK_UPDATED,
    TaskChange.DELETED: AuditAction.TASK_DELETED,
}


def completed(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored definition with the fields added to tasks since it was written (`tags`,
    `allow_concurrent_retry`) at their defaults, which is what the task had then: a change
    after an upgrade then names only the fields it changed."""
    added = {
        name: field.get_default(call_default_factory=True)
        for name, field in TaskCreate.model_fields.items()
        if name not in stored and not field.is_required()
    }
    return {**added, **stored}


def definition(task: Task) -> dict[str, Any]:
    """The task's definition as stored: every field a client sets (TaskCreate's)."""
    out = {name: getattr(task, name) for name in TaskCreate.model_fields}
    out["after"] = out["after"] or []  # NULL: a task from before migration 0012
    return out


def record(session: Session, task: Task, change: TaskChange, actor: Actor) -> TaskVersion:
    """Add the version row of a change just made to `task` (flushed: its id and version are
    known), and its audit-trail entry. A deletion is numbered after the task's last version."""
    session.flush()
    number = task.version + 1 if change == TaskChange.DELETED else task.version
    now = definition(task)
    before = now if change == TaskChange.DELETED else None
    if change == TaskChange.UPDATED:
        before = session.scalar(
            select(TaskVersion.definition)
            .where(TaskVersion.task_id == task.id)
            .order_by(TaskVersion.version.desc())
            .limit(1)
        )
        before = None if before is None else completed(before)
    trail.record(
        session,
        actor,
        _AUDITED[change],
        task.name,
        before=before,
        after=None if change == TaskChange.DELETED else now,
    )
    row = TaskVersion(
        task_id=task.id,
        version=number,
        name=task.name,
        change=change.value,
        definition=now,
        changed_by=actor.who[:WHO_MAX],
        via=actor.via.value,
        changed_at=utcnow(),
    )
    session.add(row)
    return row


def detach(session: Session, task_id: int) -> None:
    """The task is being deleted: its rows stop naming its id (which may be reused)."""
    session.flush()
    session.execute(update(TaskVersion).where(TaskVersion.task_id == task_id).values(task_id=None))


def versions_of(session: Session, task_id: int) -> list[TaskVersion]:
    """The versions of a task, newest first; NotFoundError when the task does not exist."""
    if session.get(Task, task_id) is None:
        raise NotFoundError(
            f"task {task_id} does not exist; the history of a deleted task is found by its "
            "name (GET /api/v1/task-versions?name=NAME)"
        )
    query = select(TaskVersion).where(TaskVersion.task_id == task_id)
    return list(session.scalars(query.order_by(TaskVersion.version.desc())))


def versions_named(session: Session, name: str) -> list[TaskVersion]:
    """Every version row that has `name`, the rows of deleted tasks included, newest first."""
    query = select(TaskVersion).where(TaskVersion.name == name)
    return list(session.scalars(query.order_by(TaskVersion.id.desc())))


def version_of(session: Session, task_id: int, version: int) -> TaskVersion:
    row = session.scalar(
        select(TaskVersion).where(TaskVersion.task_id == task_id, TaskVersion.version == version)
    )
    if row is None:
        known = session.scalars(
            select(TaskVersion.version)
            .where(TaskVersion.task_id == task_id)
            .order_by(TaskVersion.version)
        ).all()
        listed = ", ".join(map(str, known)) if known else "none recorded"
        raise NotFoundError(f"task {task_id} has no version {version}; its versions are: {listed}")
    return row


def changed_fields(older: dict[str, Any] | None, newer: dict[str, Any]) -> list[str]:
    """The fields that differ between two definitions (all of them after no definition)."""
    if older is None:
        return list(newer)
    older = completed(older)
    return [name for name in newer if older.get(name) != newer[name]]


def with_changes(rows: list[TaskVersion]) -> list[tuple[TaskVersion, list[str]]]:
    """Rows (newest first) each with the fields it changed from the row after it."""
    out = []
    for i, row in enumerate(rows):
        older = rows[i + 1].definition if i + 1 < len(rows) else None
        if row.change == TaskChange.DELETED.value:
            fields: list[str] = []
        elif row.change == TaskChange.CREATED.value:
            fields = changed_fields(None, row.definition)
        elif older is None:
            fields = []  # a baseline: what changed before it was never recorded
        else:
            fields = changed_fields(older, row.definition)
        out.append((row, fields))
    return out
