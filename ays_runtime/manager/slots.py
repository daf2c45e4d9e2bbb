"""The slot ledger of one task: every slot its schedule has in a time range, and what became
of each, read from the job log and from the ranges of slots no manager fired
(`ays_slot_miss`, written by the scheduler: scheduler/ledger.py). The console's slot view and
`GET /api/v1/tasks/{id}/slots` read it from here.

Contract (stable; the console builds on it):

    slot_ledger(session, task_id, start, end, *, late_after=timedelta(seconds=1),
                grace=timedelta(seconds=5), now=None, max_slots=MAX_SLOTS) -> SlotLedger

Raises NotFoundError (no such task) and ValidationError naming `from` or `to` when one is
outside 1970-9000 (schedule.check_slot_moment), when `end` is not after `start`, or when the
range holds more than `max_slots` slots of the schedule (the error says where the last
allowed slot falls). `start`, `end` and `now` are naive UTC.

`SlotLedger` (pydantic; its date-times are aware, in UTC; JSON sends them with `Z`):

    task_id, task_name, schedule, timezone, misfire_policy   the task as it is now
    start, end                 the range: slots with start <= scheduled time < end
    late_after_s               a fire claimed later than this after its slot is `late`
    schedule_error             why the schedule does not parse (then `slots` is empty), or null
    slots                      [Slot], in time order, one per slot of the current schedule
    off_schedule               [Slot] fired slots the current schedule does not have (fired
                               under an earlier schedule of the task), in time order
    counts                     {outcome: n} over `slots`, every outcome included
    misses                     [SlotMissRange] the ledger's ranges of slots not fired that
                               overlap the range: first_at, end_at (the slots in
                               [first_at, end_at)), slot_count, reason (skipped, missed),
                               manager_id (who found it), recorded_at

`Slot`: scheduled_at, outcome (SlotOutcome), lateness_s (claim time - slot time, when it
fired), folded_into (the slot the misfire policy fired instead of this one) and run (SlotRun:
the slot's first job-log row id, its status and trigger, node, created_at, started_at,
ended_at, message, and over the slot's retries: attempts, final_status).

Outcomes, from the job log (one row per fired slot, keyed by task and scheduled time) and,
for a slot without a row, from the ledger's ranges:

    fired        claimed within late_after of its time
    late         claimed later than that (lateness_s says by how much)
    fired_once   fired late by the misfire policy fire_once_now (trigger `misfire`)
    folded       not fired (missed or no row), covered by a later fired_once slot of the
                 same gap
    skipped      claimed, then not run: its row says skipped or discarded (block strategy,
                 task disabled before a retry; `run` says which), or no row and in a `skipped`
                 range: a running manager found it later than the grace and the misfire policy
                 `skip` passed it (`run` is null)
    missed       no row, in a `missed` range: no manager was running then (a manager starting
                 found it, looking back at most manager.ledger_horizon)
    not_fired    no row and no range: older than the look-back, from before the ledger, or
                 not fired for a reason no manager saw
    upcoming     not due yet, or due within `grace` (a manager may be claiming it now)
    before_task  earlier than the task's creation
"""

from __future__ import annotations

import enum
from bisect import bisect_right
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from ays_runtime.exceptions import NotFoundError, ScheduleError, ValidationError
from ays_runtime.scheduler.schedule import check_slot_moment, parse_schedule
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import JobLog, SlotMiss, Task
from ays_runtime.vocabulary import RunStatus, SlotMissReason, TriggerKind
from ays_runtime.web.fields import UtcOut

MAX_SLOTS = 10_000
_NOT_RUN = {RunStatus.SKIPPED.value, RunStatus.DISCARDED.value}


class SlotOutcome(enum.StrEnum):
    FIRED = "fired"
    LATE = "late"
    FIRED_ONCE = "fired_once"
    FOLDED = "folded"
    SKIPPED = "skipped"
    MISSED = "missed"
    NOT_FIRED = "not_fired"
    UPCOMING = "upcoming"
    BEFORE_TASK = "before_task"


_BY_REASON = {
    SlotMissReason.SKIPPED: SlotOutcome.SKIPPED,
    SlotMissReason.MISSED: SlotOutcome.MISSED,
}
# Slots without a row that a later fired_once slot of the same gap covers.
_FOLDABLE = {SlotOutcome.NOT_FIRED, SlotOutcome.MISSED}


class SlotRun(BaseModel):
    id: int = Field(description="the slot's first job-log row (attempt 0, shard 0)")
    status: str
    trigger: str
    node: str
    created_at: UtcOut = Field(description="when a manager claimed (fired) the slot")
    started_at: UtcOut | None
    ended_at: UtcOut | None
    message: str
    attempts: int = Field(description="1 + the retries of the slot")
    final_status: str = Field(description="the status of the slot's last attempt")


class Slot(BaseModel):
    scheduled_at: UtcOut
    outcome: SlotOutcome
    lateness_s: float | None = None
    folded_into: UtcOut | None = None
    run: SlotRun | None = None


class SlotMissRange(BaseModel):
    first_at: UtcOut = Field(description="the range's first slot")
    end_at: UtcOut = Field(description="the slot after the range (fired or due then)")
    slot_count: int
    reason: SlotMissReason
    manager_id: str = Field(description="the manager that found the slots not fired")
    recorded_at: UtcOut


class SlotLedger(BaseModel):
    task_id: int
    task_name: str
    schedule: str
    timezone: str
    misfire_policy: str
    start: UtcOut
    end: UtcOut
    late_after_s: float
    schedule_error: str | None
    slots: list[Slot]
    off_schedule: list[Slot]
    counts: dict[str, int]
    misses: list[SlotMissRange] = Field(default_factory=list)


def slot_ledger(
    session: Session,
    task_id: int,
    start: datetime,
    end: datetime,
    *,
    late_after: timedelta = timedelta(seconds=1),
    grace: timedelta = timedelta(seconds=5),
    now: datetime | None = None,
    max_slots: int = MAX_SLOTS,
) -> SlotLedger:
    """Every slot of the task in [start, end) and what became of it."""
    check_slot_moment("to", end)  # first: `from` may be derived from it
    check_slot_moment("from", start)
    if end <= start:
        raise ValidationError("to", end.isoformat(), f"a time after from ({start.isoformat()}Z)")
    task = session.get(Task, task_id)
    if task is None:
        raise NotFoundError(f"task {task_id} does not exist")
    now = now or utcnow()
    error: str | None = None
    try:
        times = _slot_times(task.schedule, task.timezone, start, end, max_slots)
    except ScheduleError as err:
        times, error = [], str(err)
    runs = _runs(session, task_id, start, end)
    misses = _misses(session, task_id, start, end)
    slots: list[Slot] = []
    gap: list[Slot] = []  # slots without a row since the last slot with one
    for at in times:
        rows = runs.pop(at, None)
        if rows is None:
            slot = Slot(scheduled_at=at, outcome=_unfired(at, task.created_at, now, grace))
            if slot.outcome == SlotOutcome.NOT_FIRED:
                slot.outcome = _why_not_fired(at, misses)
            if slot.outcome in _FOLDABLE:
                gap.append(slot)
            slots.append(slot)
            continue
        slot = _fired(at, rows, late_after)
        if slot.outcome == SlotOutcome.FIRED_ONCE:
            for missed in gap:
                missed.outcome, missed.folded_into = SlotOutcome.FOLDED, slot.scheduled_at
        gap = []
        slots.append(slot)
    counts = dict.fromkeys(SlotOutcome, 0)
    for slot in slots:
        counts[slot.outcome] += 1
    return SlotLedger(
        task_id=task.id,
        task_name=task.name,
        schedule=task.schedule,
        timezone=task.timezone,
        misfire_policy=task.misfire_policy,
        start=start,
        end=end,
        late_after_s=late_after.total_seconds(),
        schedule_error=error,
        slots=slots,
        off_schedule=[_fired(at, rows, late_after) for at, rows in sorted(runs.items())],
        counts={str(k): v for k, v in counts.items()},
        misses=misses,
    )


def _slot_times(
    expression: str, timezone: str, start: datetime, end: datetime, max_slots: int
) -> list[datetime]:
    times = parse_schedule(expression, timezone).slots_between(start, end, max_slots)
    if len(times) > max_slots:
        raise ValidationError(
            "to",
            end.isoformat(),
            f"a range of at most {max_slots} slots of {expression!r}; the last of them "
            f"is at {times[max_slots - 1].isoformat()}Z",
        )
    return times


def _runs(session: Session, task_id: int, start: datetime, end: datetime) -> dict[datetime, Any]:
    """The scheduled fires' rows in the range (the slot key's index), by slot time."""
    stmt = (
        select(
            JobLog.id,
            JobLog.scheduled_at,
            JobLog.trigger,
            JobLog.attempt,
            JobLog.shard_index,
            JobLog.status,
            JobLog.node,
            JobLog.created_at,
            JobLog.started_at,
            JobLog.ended_at,
            JobLog.message,
        )
        .where(
            JobLog.task_id == task_id,
            JobLog.scheduled_at >= start,
            JobLog.scheduled_at < end,
            JobLog.trigger != TriggerKind.MANUAL.value,
        )
        .order_by(JobLog.scheduled_at, JobLog.attempt, JobLog.shard_index)
    )
    by_slot: dict[datetime, list[Any]] = defaultdict(list)
    for row in session.execute(stmt):
        by_slot[row.scheduled_at].append(row)
    return dict(by_slot)


def _misses(session: Session, task_id: int, start: datetime, end: datetime) -> list[SlotMissRange]:
    """The ledger's ranges overlapping [start, end), in time order."""
    stmt = (
        select(SlotMiss)
        .where(SlotMiss.task_id == task_id, SlotMiss.first_at < end, SlotMiss.end_at > start)
        .order_by(SlotMiss.first_at)
        .limit(MAX_SLOTS)
    )
    return [
        SlotMissRange(
            first_at=m.first_at,
            end_at=m.end_at,
            slot_count=m.slot_count,
            reason=SlotMissReason(m.reason),
            manager_id=m.manager_id,
            recorded_at=m.recorded_at,
        )
        for m in session.scalars(stmt)
    ]


def _why_not_fired(at: datetime, misses: list[SlotMissRange]) -> SlotOutcome:
    """A slot with no row: `skipped` or `missed` when a range of the ledger holds it (the
    ranges are in time order; the two that start last before the slot are looked at)."""
    aware = at.replace(tzinfo=UTC)
    index = bisect_right(misses, aware, key=lambda m: m.first_at)
    for miss in misses[max(index - 2, 0) : index]:
        if aware < miss.end_at:
            return _BY_REASON[miss.reason]
    return SlotOutcome.NOT_FIRED


def _unfired(at: datetime, created: datetime, now: datetime, grace: timedelta) -> SlotOutcome:
    if at > now - grace:
        return SlotOutcome.UPCOMING
    if at < created:
        return SlotOutcome.BEFORE_TASK
    return SlotOutcome.NOT_FIRED


def _fired(at: datetime, rows: list[Any], late_after: timedelta) -> Slot:
    first = rows[0]  # attempt 0, shard 0: the slot's claim
    last = max((r for r in rows if r.shard_index == first.shard_index), key=lambda r: r.attempt)
    lateness = first.created_at - at
    if first.status in _NOT_RUN:
        outcome = SlotOutcome.SKIPPED
    elif first.trigger == TriggerKind.MISFIRE.value:
        outcome = SlotOutcome.FIRED_ONCE
    elif lateness > late_after:
        outcome = SlotOutcome.LATE
    else:
        outcome = SlotOutcome.FIRED
    return Slot(
        scheduled_at=at,
        outcome=outcome,
        lateness_s=round(max(lateness.total_seconds(), 0.0), 6),
        run=SlotRun(
            id=first.id,
            status=first.status,
            trigger=first.trigger,
            node=first.node,
            created_at=first.created_at,
            started_at=first.started_at,
            ended_at=first.ended_at,
            message=first.message,
            attempts=last.attempt + 1,
            final_status=last.status,
        ),
    )
