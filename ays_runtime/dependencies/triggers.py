"""Deciding the children's fires when parent slots end (contract: the package docstring).

`fire_children` runs inside the transaction that stored the parents' final statuses; it only
reads, inserts keyed rows (the slot key) and returns the dispatches of the rows it claimed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, case, select, update

from ays_runtime.scheduler.firing import Fire, claim_in
from ays_runtime.storage.database import insert_ignoring_duplicates
from ays_runtime.storage.models import (
    FanIn,
    FanInParent,
    JobLog,
    Task,
    TaskEdge,
    WorkflowRun,
    WorkflowTask,
)
from ays_runtime.transport.base import JobDispatch
from ays_runtime.vocabulary import AfterCondition, AfterMode, RunStatus, TriggerKind

log = logging.getLogger("ays.dependencies")

SUCCESS, FAILURE, SKIPPED = "success", "failure", "skipped"
_UNFINISHED = {RunStatus.PENDING.value, RunStatus.DISPATCHED.value, RunStatus.RUNNING.value}
_SAID = {SUCCESS: "succeeded", FAILURE: "failed", SKIPPED: "was skipped"}
# A chain of skips is followed this deep in one transaction (deeper: a graph gone wrong).
MAX_DEPTH = 100


@dataclass(frozen=True)
class _Child:
    id: int
    name: str
    enabled: bool
    mode: str
    params: str


def meets(condition: str, outcome: str) -> bool:
    if condition == AfterCondition.ALWAYS.value:
        return True
    if condition == AfterCondition.SUCCESS.value:
        return outcome == SUCCESS
    return outcome == FAILURE


def slot_outcomes(
    conn: Connection, task_ids: Iterable[int], scheduled_at: datetime, lock: bool
) -> dict[int, str | None]:
    """Each task's outcome for the slot: success, failure, skipped, or None (not ended, or
    not fired). With `lock`, a locking read (MySQL: the latest committed rows, held)."""
    ids = sorted(set(task_ids))
    query = (
        select(
            JobLog.task_id, JobLog.shard_index, JobLog.shard_total, JobLog.attempt, JobLog.status
        )
        .where(JobLog.task_id.in_(ids), JobLog.scheduled_at == scheduled_at)
        .order_by(JobLog.task_id, JobLog.shard_index, JobLog.attempt)
    )
    if lock:
        query = query.with_for_update()
    latest: dict[int, dict[int, str]] = {}
    totals: dict[int, int] = {}
    for r in conn.execute(query):
        latest.setdefault(r.task_id, {})[r.shard_index] = r.status  # the last attempt wins
        totals[r.task_id] = max(totals.get(r.task_id, 1), r.shard_total)
    out: dict[int, str | None] = {}
    for task_id in ids:
        shards = latest.get(task_id)
        if not shards or len(shards) < totals[task_id]:
            out[task_id] = None
            continue
        statuses = set(shards.values())
        if statuses & _UNFINISHED:
            out[task_id] = None
        elif statuses == {RunStatus.SUCCEEDED.value}:
            out[task_id] = SUCCESS
        elif statuses == {RunStatus.SKIPPED.value}:
            out[task_id] = SKIPPED
        else:
            out[task_id] = FAILURE
    return out


def fire_children(
    conn: Connection, manager_id: str, ended: Iterable[tuple[int, datetime]], now: datetime
) -> list[JobDispatch]:
    """The children's fires for parent slots (task id, scheduled time) whose run just became
    final in this transaction; returns the dispatches of the child rows this call claimed."""
    by_slot: dict[datetime, set[int]] = {}
    for task_id, scheduled_at in ended:
        by_slot.setdefault(scheduled_at, set()).add(task_id)
    # Most tasks have no child: one read says so for the whole batch.
    ids = sorted({t for tasks in by_slot.values() for t in tasks})
    has_children = set(
        conn.execute(
            select(Task.id)
            .join(TaskEdge, TaskEdge.parent_name == Task.name)
            .where(Task.id.in_(ids))
            .distinct()
        ).scalars()
    )
    by_slot = {at: tasks & has_children for at, tasks in by_slot.items() if tasks & has_children}
    claimed: list[JobDispatch] = []
    for scheduled_at, parents in by_slot.items():
        claimed.extend(_decide_slot(conn, manager_id, parents, scheduled_at, now))
    return claimed


def _decide_slot(
    conn: Connection, manager_id: str, parents: set[int], at: datetime, now: datetime
) -> list[JobDispatch]:
    claimed: list[JobDispatch] = []
    for _ in range(MAX_DEPTH):
        if not parents:
            break
        names = dict(conn.execute(select(Task.id, Task.name).where(Task.id.in_(parents))).all())
        if not names:
            break
        edges = conn.execute(
            select(TaskEdge.child_id, TaskEdge.parent_name, TaskEdge.condition).where(
                TaskEdge.parent_name.in_(names.values())
            )
        ).all()
        if not edges:
            break
        outcomes = slot_outcomes(conn, parents, at, lock=False)
        children = _children(conn, {e.child_id for e in edges})
        fires: list[Fire] = []
        skips: dict[int, str] = {}
        fan_in = [c for c in children.values() if c.enabled and c.mode == AfterMode.ALL.value]
        by_name = {name: task_id for task_id, name in names.items()}
        for e in edges:
            child = children.get(e.child_id)
            if child is None or not child.enabled or child.mode != AfterMode.ANY.value:
                continue
            outcome = outcomes.get(by_name[e.parent_name])
            if outcome is not None and meets(e.condition, outcome):
                fires.append(Fire(child.id, at, TriggerKind.DEPENDENCY.value, child.params))
        if fan_in:
            ready, skipped = _fan_in_arrivals(conn, fan_in, edges, outcomes, by_name, at)
            fires.extend(Fire(c.id, at, TriggerKind.DEPENDENCY.value, c.params) for c in ready)
            skips.update(skipped)
        if fires:
            fires = _in_workflow_runs(conn, _next_attempts(conn, _unique(fires), at), at)
            claimed.extend(claim_in(conn, manager_id, fires, now))
        # A child skipped is a parent ended in turn: its own children are decided next.
        parents = _write_skips(conn, manager_id, skips, at, now)
    return claimed


def _children(conn: Connection, ids: set[int]) -> dict[int, _Child]:
    rows = conn.execute(
        select(Task.id, Task.name, Task.enabled, Task.after_mode, Task.params).where(
            Task.id.in_(ids)
        )
    ).all()
    return {r.id: _Child(r.id, r.name, bool(r.enabled), r.after_mode, r.params) for r in rows}


def _fan_in_arrivals(
    conn: Connection,
    children: list[_Child],
    edges: Sequence[Any],
    outcomes: dict[int, str | None],
    by_name: dict[str, int],
    at: datetime,
) -> tuple[list[_Child], dict[int, str]]:
    """The `all` children ready to fire for slot `at` and those to skip (id -> message), as
    the parents in `outcomes` end: a parent that does not meet its condition skips the
    child; those that do are counted on the child's slot (`ays_fan_in`), and the child is
    checked in full (`_fan_in`, reading every parent) only when its slot's row is created
    and when the count reaches its parents': a fan-in of n parents costs O(n), not O(n^2)."""
    by_id = {c.id: c for c in children}
    skips: dict[int, str] = {}
    arrived: dict[int, set[int]] = {}
    for e in sorted(edges, key=lambda e: e.parent_name):
        parent = by_name[e.parent_name]
        outcome = outcomes.get(parent)
        if e.child_id not in by_id or outcome is None:
            continue
        if meets(e.condition, outcome):
            arrived.setdefault(e.child_id, set()).add(parent)
        else:
            skips.setdefault(e.child_id, f"skipped: parent {e.parent_name} {_SAID[outcome]}")
    counting = {c: ps for c, ps in arrived.items() if c not in skips}
    if not counting:
        return [], skips
    # Every child of the batch at once: a fan-out to many children is a few statements.
    token = uuid.uuid4().hex
    new = _count_parents(conn, counting, at, token)
    insert_ignoring_duplicates(
        conn,
        FanIn,
        [
            {"child_id": c, "scheduled_at": at, "met": 0, "needed": 0, "claim": token}
            for c in sorted(counting)
        ],
        keep="claim",
    )
    rows = conn.execute(
        select(FanIn.child_id, FanIn.met, FanIn.needed, FanIn.claim)
        .where(FanIn.child_id.in_(sorted(counting)), FanIn.scheduled_at == at)
        .with_for_update()  # the latest counts, held: two managers count one after another
    ).all()
    to_check: list[_Child] = []
    counts: dict[int, tuple[int, int]] = {}
    for row in rows:
        if row.claim == token:  # created here: the parents ended before are counted in full
            to_check.append(by_id[row.child_id])
            continue
        met = row.met + new.get(row.child_id, 0)
        counts[row.child_id] = (met, row.needed)
        if met >= row.needed:
            to_check.append(by_id[row.child_id])
    ready: list[_Child] = []
    if to_check:
        ready, more_skips, checked = _fan_in(conn, to_check, at)
        skips = {**skips, **more_skips}
        counts.update(checked)
    _set_counts(conn, counts, at)
    return ready, skips


def _count_parents(
    conn: Connection, arrived: dict[int, set[int]], at: datetime, token: str
) -> dict[int, int]:
    """Record the parents as counted on their children's slot; per child, how many were not
    counted before."""
    rows = [
        {"child_id": c, "scheduled_at": at, "parent_id": p, "claim": token}
        for c in sorted(arrived)
        for p in sorted(arrived[c])
    ]
    insert_ignoring_duplicates(conn, FanInParent, rows, keep="claim")
    parents = sorted({p for ps in arrived.values() for p in ps})
    found = conn.execute(
        select(FanInParent.child_id, FanInParent.parent_id, FanInParent.claim)
        .where(
            FanInParent.child_id.in_(sorted(arrived)),
            FanInParent.scheduled_at == at,
            FanInParent.parent_id.in_(parents),
        )
        .with_for_update()  # the latest rows: another manager's count of a parent wins
    ).all()
    new: dict[int, int] = {}
    for r in found:
        if r.claim == token and r.parent_id in arrived[r.child_id]:
            new[r.child_id] = new.get(r.child_id, 0) + 1
    return new


def _set_counts(conn: Connection, counts: dict[int, tuple[int, int]], at: datetime) -> None:
    """Write each child's (met, needed) for slot `at`, in one statement."""
    if not counts:
        return
    conn.execute(
        update(FanIn)
        .where(FanIn.child_id.in_(sorted(counts)), FanIn.scheduled_at == at)
        .values(
            met=case({c: m for c, (m, _) in counts.items()}, value=FanIn.child_id),
            needed=case({c: n for c, (_, n) in counts.items()}, value=FanIn.child_id),
        )
    )


def _fan_in(
    conn: Connection, children: list[_Child], at: datetime
) -> tuple[list[_Child], dict[int, str], dict[int, tuple[int, int]]]:
    """The `all` children ready to fire for slot `at`, those to skip (id -> message), and
    per child (its parents ended meeting their condition, its parents counted)."""
    ids = [c.id for c in children]
    edges = conn.execute(
        select(TaskEdge.child_id, TaskEdge.parent_name, TaskEdge.condition, Task.id, Task.enabled)
        .join(Task, Task.name == TaskEdge.parent_name)
        .where(TaskEdge.child_id.in_(ids))
    ).all()
    # Locking read: the latest committed state of every parent (see the package docstring).
    outcomes = slot_outcomes(conn, {e.id for e in edges}, at, lock=True)
    ready: list[_Child] = []
    skips: dict[int, str] = {}
    counts: dict[int, tuple[int, int]] = {}
    mine_of: dict[int, list[Any]] = {}
    for e in edges:
        mine_of.setdefault(e.child_id, []).append(e)
    for child in children:
        mine = mine_of.get(child.id, [])
        # A disabled parent is left out, unless it ran this slot anyway (by hand).
        counted = [e for e in mine if e.enabled or outcomes.get(e.id) is not None]
        met = sum(
            1
            for e in counted
            if outcomes.get(e.id) is not None and meets(e.condition, outcomes[e.id] or "")
        )
        counts[child.id] = (met, len(counted))
        failed = next(
            (
                e
                for e in counted
                if outcomes.get(e.id) is not None and not meets(e.condition, outcomes[e.id] or "")
            ),
            None,
        )
        if failed is not None:
            said = _SAID[outcomes[failed.id] or FAILURE]
            skips[child.id] = f"skipped: parent {failed.parent_name} {said}"
        elif counted and all(outcomes.get(e.id) is not None for e in counted):
            ready.append(child)
    return ready, skips, counts


def _write_skips(
    conn: Connection, manager_id: str, skips: dict[int, str], at: datetime, now: datetime
) -> set[int]:
    """Write the children's slots as skipped (unless the slot has its row already); their
    ids, to decide their own children next (deciding twice is harmless: the slot key)."""
    if not skips:
        return set()
    rows = [
        {
            "task_id": task_id,
            "scheduled_at": at,
            "trigger": TriggerKind.DEPENDENCY.value,
            "attempt": 0,
            "shard_index": 0,
            "shard_total": 1,
            "params": "",
            "claim": f"skip-{manager_id}"[:32],
            "manager_id": manager_id,
            "node": "",
            "status": RunStatus.SKIPPED.value,
            "created_at": now,
            "ended_at": now,
            "due_at": None,
            "output": "",
            "message": message[:1024],
        }
        for task_id, message in skips.items()
    ]
    before = set(
        conn.execute(
            select(JobLog.task_id).where(
                JobLog.task_id.in_(skips), JobLog.scheduled_at == at, JobLog.attempt == 0
            )
        ).scalars()
    )
    insert_ignoring_duplicates(conn, JobLog, rows, keep="claim")
    for task_id in set(skips) - before:
        log.info("manager %s: task %d slot %s: %s", manager_id, task_id, at, skips[task_id])
    return set(skips)


def _next_attempts(conn: Connection, fires: list[Fire], at: datetime) -> list[Fire]:
    """A child whose slot ended `skipped` by its parents fires as the slot's next attempt
    (its parents' outcome changed: a workflow rerun); otherwise as attempt 0 (the slot key
    makes a second fire of it nothing)."""
    latest: dict[int, tuple[int, str, str]] = {}
    for r in conn.execute(
        select(JobLog.task_id, JobLog.attempt, JobLog.status, JobLog.trigger)
        .where(
            JobLog.task_id.in_([f.task_id for f in fires]),
            JobLog.scheduled_at == at,
            JobLog.shard_index == 0,
        )
        .order_by(JobLog.attempt)
    ):
        latest[r.task_id] = (r.attempt, r.status, r.trigger)
    out = []
    for fire in fires:
        last = latest.get(fire.task_id)
        if last is not None and last[1:] == (RunStatus.SKIPPED.value, TriggerKind.DEPENDENCY.value):
            fire = replace(fire, attempt=last[0] + 1)
        out.append(fire)
    return out


def _in_workflow_runs(conn: Connection, fires: list[Fire], at: datetime) -> list[Fire]:
    """A child in a workflow run of this slot runs with the run's params."""
    params = dict(
        conn.execute(
            select(WorkflowTask.task_id, WorkflowRun.params)
            .join(WorkflowRun, WorkflowRun.workflow_id == WorkflowTask.workflow_id)
            .where(
                WorkflowTask.task_id.in_([f.task_id for f in fires]),
                WorkflowRun.scheduled_at == at,
            )
        ).all()
    )
    if not params:
        return fires
    return [replace(f, params=params[f.task_id]) if f.task_id in params else f for f in fires]


def _unique(fires: list[Fire]) -> list[Fire]:
    seen: dict[tuple[int, datetime], Fire] = {}
    for fire in fires:
        seen.setdefault((fire.task_id, fire.scheduled_at), fire)
    return list(seen.values())
