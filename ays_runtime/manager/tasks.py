"""Tasks, node groups, job logs and nodes as the API (or any caller) changes and reads them.

Plain synchronous functions over a SQLAlchemy `Session`, usable without HTTP. Each change
validates its input completely, commits, and returns the stored row; the caller then tells
the manager to reconcile (`ManagerContext.on_tasks_changed`). Every change to a task, or to the
node group it runs in, bumps `Task.version` and sets `updated_at`; a call that changes nothing
(enabling an enabled task, a PUT of the same values) leaves both alone.

Every change of a task records a version of it in the same transaction (see
`ays_runtime.manager.versions`), by the keyword argument `actor`: who (a string) and through
what (`ChangeVia`). It defaults to `API_ACTOR` (the shared token, via the API); the console,
apply and rollback pass their own.

Raises (from `ays_runtime.exceptions`):

* `ValidationError` – a field has a bad value: names the field, the value and what is expected;
* `NotFoundError`   – the task, node group or job log does not exist;
* `ConflictError`   – a duplicate name, a node group still in use, or a concurrent change
  that clashed at commit;
* `StorageError`    – the database failed or could not be reached.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import ColumnElement, Select, delete, func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from ays_runtime.audit import trail
from ays_runtime.dependencies import graph
from ays_runtime.exceptions import (
    AysError,
    ConflictError,
    NotFoundError,
    StorageError,
    ValidationError,
)
from ays_runtime.manager import versions
from ays_runtime.manager.schemas import (
    MAX_TAGS,
    PAYLOAD_MODELS,
    NodeGroupCreate,
    NodeGroupUpdate,
    TaskCreate,
    TaskUpdate,
    tag_name,
    validated,
)
from ays_runtime.manager.versions import API_ACTOR, Actor
from ays_runtime.scheduler.schedule import parse_schedule
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import (
    JobLog,
    Node,
    NodeGroup,
    NodeStatus,
    RunStatus,
    Task,
    TaskEdge,
    TaskVersion,
    has_tag,
)
from ays_runtime.vocabulary import AuditAction, ChangeVia, TaskChange

MAX_PAGE = 1000
DEFAULT_PAGE = 100

P = ParamSpec("P")
R = TypeVar("R")


def storage_errors(
    action: str,
) -> Callable[[Callable[Concatenate[Session, P], R]], Callable[Concatenate[Session, P], R]]:
    """Translate what SQLAlchemy raises past the checks below into our errors."""

    def wrap(fn: Callable[Concatenate[Session, P], R]) -> Callable[Concatenate[Session, P], R]:
        @functools.wraps(fn)
        def run(session: Session, /, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(session, *args, **kwargs)
            except IntegrityError as err:
                session.rollback()
                raise ConflictError(
                    f"cannot {action}: it clashes with a concurrent change ({err.orig})"
                ) from err
            except DBAPIError as err:
                session.rollback()
                raise StorageError(f"cannot {action}: the database failed: {err.orig}") from err

        return run

    return wrap


def _commit(session: Session, explain: Callable[[], AysError]) -> None:
    """Commit; a constraint the checks did not foresee (a race) becomes `explain()`."""
    try:
        session.commit()
    except IntegrityError as err:
        session.rollback()
        raise explain() from err


# --- tasks ----------------------------------------------------------------------------------


@storage_errors("create the task")
def create_task(session: Session, data: Mapping[str, Any], *, actor: Actor = API_ACTOR) -> Task:
    """Validate `data` (the fields of `TaskCreate`) and store a new task at version 1."""
    spec = validated(TaskCreate, data)
    task = insert_task(session, spec, actor)
    _commit(session, lambda: _explain_task_clash(session, spec, task_id=None))
    return task


@storage_errors("update the task")
def update_task(
    session: Session, task_id: int, changes: Mapping[str, Any], *, actor: Actor = API_ACTOR
) -> Task:
    """Apply any subset of the task's fields; the result is validated as a whole."""
    patch = validated(TaskUpdate, changes).model_dump(mode="json", exclude_unset=True)
    task = _task(session, task_id)
    spec = validated(TaskCreate, {**versions.definition(task), **patch})
    if change_task(session, task, spec, actor):
        _commit(session, lambda: _explain_task_clash(session, spec, task_id=task_id))
        session.refresh(task)
    return task


@storage_errors("delete the task")
def delete_task(session: Session, task_id: int, *, actor: Actor = API_ACTOR) -> None:
    """Delete the task; its job logs stay (they age out with the retention), and so does its
    history (a last version records the deletion)."""
    remove_task(session, _task(session, task_id), actor)
    session.commit()


@storage_errors("enable or disable the task")
def set_task_enabled(
    session: Session, task_id: int, enabled: bool, *, actor: Actor = API_ACTOR
) -> Task:
    task = _task(session, task_id)
    if task.enabled != enabled:
        task.enabled = enabled
        _bump(task)
        versions.record(session, task, TaskChange.UPDATED, actor)
        session.commit()
        session.refresh(task)
    return task


def enable_task(session: Session, task_id: int, *, actor: Actor = API_ACTOR) -> Task:
    return set_task_enabled(session, task_id, True, actor=actor)


def disable_task(session: Session, task_id: int, *, actor: Actor = API_ACTOR) -> Task:
    return set_task_enabled(session, task_id, False, actor=actor)


@storage_errors("roll the task back")
def rollback_task(
    session: Session, task_id: int, version: int, *, actor: Actor = API_ACTOR
) -> Task:
    """Write the definition of the task's version `version` back, as a new version (via
    `rollback`, by `actor.who`). Nothing changes when the task has that definition already.
    Refused (ValidationError) when that definition is no longer valid, e.g. its node group
    was deleted since."""
    task = _task(session, task_id)
    target = versions.version_of(session, task_id, version)
    try:
        spec = validated(TaskCreate, target.definition)
        if change_task(session, task, spec, actor.through(ChangeVia.ROLLBACK)):
            _commit(session, lambda: _explain_task_clash(session, spec, task_id=task_id))
            session.refresh(task)
    except ValidationError as err:
        session.rollback()
        raise ValidationError(
            "version", version, f"a definition valid today; version {version}'s is not ({err})"
        ) from None
    return task


@storage_errors("read the task")
def get_task(session: Session, task_id: int) -> Task:
    return _task(session, task_id)


@storage_errors("read the task's history")
def task_versions(session: Session, task_id: int) -> list[TaskVersion]:
    """The task's versions, newest first (see `ays_runtime.manager.versions`)."""
    return versions.versions_of(session, task_id)


@storage_errors("read the task history")
def task_versions_named(session: Session, name: str) -> list[TaskVersion]:
    """Every version that had the name `name`, deleted tasks' included, newest first."""
    return versions.versions_named(session, name)


@storage_errors("list tasks")
def list_tasks(
    session: Session,
    *,
    node_group: str | None = None,
    enabled: bool | None = None,
    name: str | None = None,
    tags: Sequence[str] = (),
    limit: int = DEFAULT_PAGE,
    offset: int = 0,
) -> tuple[list[Task], int]:
    """Tasks by id, filtered (`name` is a substring; the tasks carry every tag of `tags`),
    one page of them and the total."""
    _check_paging(limit, offset)
    if len(tags) > MAX_TAGS:
        raise ValidationError("tag", list(tags), f"at most {MAX_TAGS} tags (a task has no more)")
    where: list[ColumnElement[bool]] = [has_tag(_tag_filter(tag)) for tag in tags]
    if node_group is not None:
        where.append(Task.node_group == node_group)
    if enabled is not None:
        where.append(Task.enabled == enabled)
    if name:
        where.append(Task.name.contains(name, autoescape=True))
    query = select(Task).where(*where).order_by(Task.id)
    return _page(session, query, where, Task, limit, offset)


# Uncommitted steps of the changes above, for callers that make several changes in one
# transaction (tasks as code: `ays_runtime.manager.apply`). Each records the task's version.


def insert_task(session: Session, spec: TaskCreate, actor: Actor) -> Task:
    """Add a new task at version 1 (flushed, not committed)."""
    columns = _checked_columns(session, spec, task_id=None)
    now = utcnow()
    task = Task(**columns, version=1, created_at=now, updated_at=now)
    session.add(task)
    graph.save_edges(session, task)
    versions.record(session, task, TaskChange.CREATED, actor)
    return task


def change_task(session: Session, task: Task, spec: TaskCreate, actor: Actor) -> bool:
    """Give `task` the definition `spec` (flushed, not committed); False when it had it."""
    columns = _checked_columns(session, spec, task_id=task.id)
    changed = {k: v for k, v in columns.items() if getattr(task, k) != v}
    if changed.keys() == {"after"} and not task.after and not columns["after"]:
        changed = {}  # None (a task from before migration 0012) and [] say the same
    if not changed:
        return False
    old_name = task.name
    for key, value in changed.items():
        setattr(task, key, value)
    _bump(task)
    if "name" in changed:
        for child in graph.rename_parent(session, old_name, task.name):
            if child.id != task.id:
                _bump(child)
                versions.record(session, child, TaskChange.UPDATED, actor)
    if "after" in changed or "name" in changed:
        graph.save_edges(session, task)
    versions.record(session, task, TaskChange.UPDATED, actor)
    return True


def remove_task(session: Session, task: Task, actor: Actor) -> None:
    """Delete `task` (not committed), recording the deletion in its history."""
    versions.record(session, task, TaskChange.DELETED, actor)
    versions.detach(session, task.id)
    session.execute(delete(TaskEdge).where(TaskEdge.child_id == task.id))  # SQLite: no FK
    session.delete(task)


def task_columns(spec: TaskCreate) -> dict[str, Any]:
    """The columns of a task as stored, from a valid request; raises ValidationError on what
    the request model alone cannot see (the schedule in its time zone, the payload of the
    task type). The database checks (node group, name) are the caller's."""
    if spec.schedule:  # empty: fired only by its parents, its workflow, or by hand
        parse_schedule(spec.schedule, spec.timezone)  # names `timezone` or `schedule`
    payload = validated(PAYLOAD_MODELS[spec.task_type], spec.payload, prefix="payload")
    columns = spec.model_dump(mode="json")
    columns["payload"] = payload.model_dump(mode="json", exclude_none=True)
    return columns


def _task(session: Session, task_id: int) -> Task:
    task = session.get(Task, task_id)
    if task is None:
        raise NotFoundError(f"task {task_id} does not exist")
    return task


def _bump(task: Task) -> None:
    # In SQL, so that two concurrent changes give two versions, never one.
    task.version = Task.version + 1
    task.updated_at = utcnow()


def _checked_columns(session: Session, spec: TaskCreate, task_id: int | None) -> dict[str, Any]:
    """The columns of a valid task; raises on what the request model alone cannot see."""
    columns = task_columns(spec)
    graph.check_parents(session, spec.name, columns["after"])
    if _group_id(session, spec.node_group) is None:
        raise ValidationError(
            "node_group",
            spec.node_group,
            f"no such node group: no node has joined it yet; start a node with -g "
            f"{spec.node_group} (the group is created when it joins), or create the group "
            "with POST /api/v1/node-groups",
        )
    other = _task_id_by_name(session, spec.name)
    if other is not None and other != task_id:
        raise ConflictError(
            f"name: task name {spec.name!r} is already taken by task {other}; choose another"
        )
    return columns


def _explain_task_clash(session: Session, spec: TaskCreate, task_id: int | None) -> AysError:
    other = _task_id_by_name(session, spec.name)
    if other is not None and other != task_id:
        return ConflictError(
            f"name: task name {spec.name!r} was just taken by task {other}; choose another"
        )
    return ConflictError(
        f"node_group: node group {spec.node_group!r} was deleted meanwhile; create it again"
    )


def _task_id_by_name(session: Session, name: str) -> int | None:
    return session.scalar(select(Task.id).where(Task.name == name))


# --- node groups ----------------------------------------------------------------------------


@storage_errors("create the node group")
def create_node_group(
    session: Session, data: Mapping[str, Any], *, actor: Actor = API_ACTOR
) -> NodeGroup:
    spec = validated(NodeGroupCreate, data)
    group = insert_node_group(session, spec, actor)
    _commit(session, lambda: ConflictError(f"name: node group {spec.name!r} already exists"))
    return group


def insert_node_group(
    session: Session, spec: NodeGroupCreate, actor: Actor = API_ACTOR
) -> NodeGroup:
    """Add a node group (not committed); ConflictError when the name is taken."""
    if _group_id(session, spec.name) is not None:
        raise ConflictError(f"name: node group {spec.name!r} already exists")
    now = utcnow()
    group = NodeGroup(name=spec.name, description=spec.description, created_at=now, updated_at=now)
    session.add(group)
    trail.record(session, actor, AuditAction.GROUP_CREATED, spec.name, after=_described(group))
    return group


def describe_node_group(
    session: Session, group: NodeGroup, description: str, actor: Actor = API_ACTOR
) -> None:
    """Give `group` a new description (not committed); nothing when it has it."""
    if group.description == description:
        return
    before = _described(group)
    group.description = description
    group.updated_at = utcnow()
    trail.record(
        session,
        actor,
        AuditAction.GROUP_UPDATED,
        group.name,
        before=before,
        after=_described(group),
    )


def _described(group: NodeGroup) -> dict[str, Any]:
    """A node group's definition, as the audit trail keeps it."""
    return {"name": group.name, "description": group.description}


@storage_errors("update the node group")
def update_node_group(
    session: Session, name: str, changes: Mapping[str, Any], *, actor: Actor = API_ACTOR
) -> NodeGroup:
    """Change the description and/or the name; on a rename the group's tasks (by the foreign
    key's ON UPDATE CASCADE) and nodes follow, and the tasks' versions are bumped and
    recorded (by `actor`)."""
    spec = validated(NodeGroupUpdate, changes)
    group = _group(session, name)
    before = _described(group)
    now = utcnow()
    changed = False
    if spec.description is not None and spec.description != group.description:
        group.description = spec.description
        changed = True
    new_name = spec.name
    if new_name is not None and new_name != group.name:
        if _group_id(session, new_name) is not None:
            raise ConflictError(f"name: node group {new_name!r} already exists")
        group.name = new_name
        session.flush()
        session.execute(
            update(Node).where(Node.node_group == name).values(node_group=new_name, updated_at=now)
        )
        session.execute(
            update(Task)
            .where(Task.node_group == new_name)
            .values(version=Task.version + 1, updated_at=now)
        )
        moved = select(Task).where(Task.node_group == new_name)
        for task in session.scalars(moved.execution_options(populate_existing=True)):
            versions.record(session, task, TaskChange.UPDATED, actor)
        changed = True
    if changed:
        group.updated_at = now
        trail.record(
            session, actor, AuditAction.GROUP_UPDATED, name, before=before, after=_described(group)
        )
        _commit(session, lambda: ConflictError(f"name: node group {group.name!r} already exists"))
    return group


@storage_errors("delete the node group")
def delete_node_group(session: Session, name: str, *, actor: Actor = API_ACTOR) -> None:
    """Delete an unused group; refused (ConflictError) while tasks still run in it."""
    remove_node_group(session, _group(session, name), actor)
    _commit(session, lambda: ConflictError(f"node group {name!r} was just given a task"))


def remove_node_group(session: Session, group: NodeGroup, actor: Actor = API_ACTOR) -> None:
    """Delete `group` (not committed); ConflictError while tasks still run in it."""
    session.flush()
    used = session.scalar(
        select(func.count()).select_from(Task).where(Task.node_group == group.name)
    )
    if used:
        raise ConflictError(
            f"node group {group.name!r} is used by {used} task(s); "
            "move them to another group or delete them first"
        )
    trail.record(session, actor, AuditAction.GROUP_DELETED, group.name, before=_described(group))
    session.delete(group)


@storage_errors("read the node group")
def get_node_group(session: Session, name: str) -> NodeGroup:
    return _group(session, name)


@storage_errors("list node groups")
def list_node_groups(session: Session) -> list[NodeGroup]:
    return list(session.scalars(select(NodeGroup).order_by(NodeGroup.name)))


def _group(session: Session, name: str) -> NodeGroup:
    group = session.scalar(select(NodeGroup).where(NodeGroup.name == name))
    if group is None:
        raise NotFoundError(f"node group {name!r} does not exist")
    return group


def _group_id(session: Session, name: str) -> int | None:
    return session.scalar(select(NodeGroup.id).where(NodeGroup.name == name))


# --- job logs and nodes (read only) ---------------------------------------------------------


@storage_errors("list job logs")
def list_job_logs(
    session: Session,
    *,
    task_id: int | None = None,
    status: str | None = None,
    node: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = DEFAULT_PAGE,
    offset: int = 0,
) -> tuple[list[JobLog], int]:
    """Job logs newest first; `since` <= created_at < `until` (naive UTC, or aware)."""
    _check_paging(limit, offset)
    since, until = _naive_utc(since), _naive_utc(until)  # an empty window finds nothing
    where: list[ColumnElement[bool]] = []
    if task_id is not None:
        where.append(JobLog.task_id == task_id)
    if status is not None:
        where.append(JobLog.status == _choice("status", status, RunStatus))
    if node is not None:
        where.append(JobLog.node == node)
    if since is not None:
        where.append(JobLog.created_at >= since)
    if until is not None:
        where.append(JobLog.created_at < until)
    query = select(JobLog).where(*where).order_by(JobLog.created_at.desc(), JobLog.id.desc())
    return _page(session, query, where, JobLog, limit, offset)


@storage_errors("read the job log")
def get_job_log(session: Session, job_log_id: int) -> JobLog:
    log = session.get(JobLog, job_log_id)
    if log is None:
        raise NotFoundError(f"job log {job_log_id} does not exist")
    return log


@storage_errors("list nodes")
def list_nodes(
    session: Session,
    *,
    node_group: str | None = None,
    status: str | None = None,
    limit: int = DEFAULT_PAGE,
    offset: int = 0,
) -> tuple[list[Node], int]:
    _check_paging(limit, offset)
    where: list[ColumnElement[bool]] = []
    if node_group is not None:
        where.append(Node.node_group == node_group)
    if status is not None:
        where.append(Node.status == _choice("status", status, NodeStatus))
    query = select(Node).where(*where).order_by(Node.node_group, Node.ip, Node.port)
    return _page(session, query, where, Node, limit, offset)


# --- shared ---------------------------------------------------------------------------------

Row = TypeVar("Row", Task, JobLog, Node)


def _page(
    session: Session,
    query: Select[Any],
    where: list[ColumnElement[bool]],
    table: type[Row],
    limit: int,
    offset: int,
) -> tuple[list[Row], int]:
    total = session.scalar(select(func.count()).select_from(table).where(*where)) or 0
    items = list(session.scalars(query.limit(limit).offset(offset)))
    return items, total


def _check_paging(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ValidationError("limit", limit, f"between 1 and {MAX_PAGE}")
    if offset < 0:
        raise ValidationError("offset", offset, "0 or more")


def _tag_filter(tag: str) -> str:
    try:
        return tag_name(tag)
    except ValueError as err:
        raise ValidationError("tag", tag, str(err)) from None


def _choice(field: str, value: str, choices: type[Any]) -> str:
    allowed = [member.value for member in choices]
    if value not in allowed:
        raise ValidationError(field, value, f"one of {', '.join(allowed)}")
    return value


def _naive_utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)
