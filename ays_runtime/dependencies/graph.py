"""The dependency graph as tasks are saved: edges written, cycles refused, parents checked.

Called by `ays_runtime.manager.tasks` inside the change's transaction (a Session, flushed,
not committed). Raises `ValidationError` naming the field `after` and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from ays_runtime.exceptions import ValidationError
from ays_runtime.storage.models import Task, TaskEdge

MAX_PARENTS = 1000


def check_parents(session: Session, name: str, after: Sequence[dict[str, str]]) -> None:
    """Every parent exists, none twice, not the task itself (before the task is flushed)."""
    if not after:
        return
    names = [edge["task"] for edge in after]
    if name in names:
        raise ValidationError("after", name, "other tasks: a task cannot run after itself")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValidationError("after", twice, "each parent once (give it one condition)")
    known = set(session.scalars(select(Task.name).where(Task.name.in_(names))))
    missing = [n for n in names if n not in known]
    if missing:
        raise ValidationError(
            "after",
            missing,
            "names of existing tasks: create the parent task(s) first, or remove them",
        )


def save_edges(session: Session, task: Task) -> None:
    """Make `ays_task_edge` say what `task.after` says, then refuse a cycle through it."""
    session.flush()  # the task has its id, and its new name is visible
    session.execute(delete(TaskEdge).where(TaskEdge.child_id == task.id))
    after = task.after or []
    if after:
        session.add_all(
            TaskEdge(child_id=task.id, parent_name=e["task"], condition=e["condition"])
            for e in after
        )
        session.flush()
        cycle = find_cycle(session, task.name)
        if cycle:
            raise ValidationError(
                "after",
                [e["task"] for e in after],
                f"no cycle; this makes one: {' -> '.join(cycle)}; remove one of its edges",
            )


def find_cycle(session: Session, start: str) -> list[str]:
    """A cycle through `start` (names in run order, `start` first and last), or []
    (depth-first search over the parents, as stored: children -> parents)."""
    rows = session.execute(
        select(Task.name, TaskEdge.parent_name).join(Task, Task.id == TaskEdge.child_id)
    ).all()
    parents: dict[str, list[str]] = {}
    for child, parent in rows:
        parents.setdefault(child, []).append(parent)
    path = [start]
    seen: set[str] = set()
    stack = [iter(parents.get(start, []))]
    while stack:
        nxt = next(stack[-1], None)
        if nxt is None:
            stack.pop()
            path.pop()
            continue
        if nxt == start:
            # `path` goes child -> parent; shown in run order (parent -> child)
            return [start, *reversed(path[1:]), start]
        if nxt in seen:
            continue
        seen.add(nxt)
        path.append(nxt)
        stack.append(iter(parents.get(nxt, [])))
    return []


def rename_parent(session: Session, old: str, new: str) -> list[Task]:
    """A task renamed: its children's edges and `after` follow; the children changed."""
    children = list(
        session.scalars(
            select(Task)
            .join(TaskEdge, TaskEdge.child_id == Task.id)
            .where(TaskEdge.parent_name == old)
        )
    )
    session.execute(update(TaskEdge).where(TaskEdge.parent_name == old).values(parent_name=new))
    for child in children:
        child.after = [{**e, "task": new} if e["task"] == old else e for e in (child.after or [])]
    return children


def problems(session: Session, task: Task) -> list[str]:
    """What is wrong with the task's parents: deleted, or disabled (they will not fire it)."""
    after = task.after or []
    if not after:
        return []
    names = [e["task"] for e in after]
    enabled = dict(
        session.execute(select(Task.name, Task.enabled).where(Task.name.in_(names))).all()
    )
    out = []
    for name in names:
        if name not in enabled:
            out.append(f"parent {name} is deleted: it will not fire this task")
        elif not enabled[name]:
            out.append(f"parent {name} is disabled: only its runs by hand fire this task")
    return out
