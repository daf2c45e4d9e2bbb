"""The slot ledger's rows: ranges of a task's slots that no manager fired (`ays_slot_miss`).

The job log has a row for every slot a manager fired; what it cannot show is why a slot has
none. The scheduler says so where it decides it:

    skipped   a running manager found a timer later than misfire_grace (a stalled host, a
              clock jump) and the task's misfire policy is `skip` (Scheduler.fire_due);
    missed    a manager starting (or installing a task's timer again) found slots owed since
              the task's last fire, or since its last change, that no manager fired: no
              manager was running then (Reconciler._install). Whatever the misfire policy:
              with `fire_once_now` the latest of them fires once, and the range ends before it.

A range is the slots in [first_at, end_at), end_at being the next slot the schedule fires or
fires once. It reaches back at most `horizon` (manager.ledger_horizon), clipped by whole
horizons from its first slot, so that two managers starting at once clip alike.

Rows are written by the claim writer (FireWriter.note_missed) in the transaction of its next
claim batch, never by the fire loop itself; the slots of a range are counted there too.
Keyed by (task_id, first_at) with "insert, or widen": managers finding the same range record
it once, and a longer range from the same first slot (a manager that went down again before
firing anything) widens the row. Slots are counted (ays_slots_missed_total) once per range:
by the insert that made the row, and by each widening for the slots it added.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, select, update

from ays_runtime.scheduler.schedule import Schedule
from ays_runtime.storage.database import insert_ignoring_duplicates
from ays_runtime.storage.models import SlotMiss
from ays_runtime.vocabulary import SlotMissReason

_TINY = timedelta(microseconds=1)
DEFAULT_HORIZON = timedelta(days=1)


@dataclass(frozen=True)
class OwedRange:
    """Slots [first_at, end_at) of a task that were not fired, and why."""

    task_id: int
    first_at: datetime
    end_at: datetime
    reason: SlotMissReason
    schedule: Schedule


def owed_range(
    task_id: int,
    schedule: Schedule,
    first_at: datetime,
    end_at: datetime,
    reason: SlotMissReason,
    now: datetime,
    horizon: timedelta = DEFAULT_HORIZON,
) -> OwedRange | None:
    """The range from slot `first_at` up to `end_at`, reaching back at most `horizon` from
    `now`; None when that holds no slot."""
    oldest = now - horizon
    if first_at < oldest:
        horizons = -(-(oldest - first_at) // horizon)
        first_at = schedule.next_after(first_at + horizons * horizon - _TINY)
    if first_at >= end_at:
        return None
    return OwedRange(task_id, first_at, end_at, reason, schedule)


@lru_cache(maxsize=4096)
def count_between(schedule: Schedule, start: datetime, end: datetime) -> int:
    """`schedule.count_between`, remembered: a manager starting after a long stop finds the
    same range for every task that shares a schedule (schedules are shared instances)."""
    return schedule.count_between(start, end)


def record_owed(
    conn: Connection, manager_id: str, ranges: Sequence[OwedRange], now: datetime
) -> Counter[str]:
    """Write `ranges` (inside the caller's transaction); returns the slots newly recorded by
    reason: a range this call inserted counts all its slots, a range already recorded (by
    anyone) counts only the slots this call widened it by, so that a range recorded twice,
    by one manager or by two at once, is counted once.

    Which rows this call inserted is read back by its mark (this manager, `now`): an insert
    that met an existing row changes neither. The rows already there are widened under a
    row lock (a locking read sees the latest committed count), so two managers widening
    the same range count the difference once."""
    if not ranges:
        return Counter()
    rows: dict[tuple[int, datetime], dict[str, Any]] = {
        (r.task_id, r.first_at): {
            "task_id": r.task_id,
            "first_at": r.first_at,
            "end_at": r.end_at,
            "slot_count": count_between(r.schedule, r.first_at, r.end_at),
            "reason": r.reason.value,
            "manager_id": manager_id,
            "recorded_at": now,
        }
        for r in sorted(ranges, key=lambda r: (r.task_id, r.first_at, r.end_at))
    }  # the widest of a key's ranges last, so the one kept
    insert_ignoring_duplicates(conn, SlotMiss, list(rows.values()), keep="id")
    keys = list(rows)
    inserted: set[tuple[int, datetime]] = set()
    existing: dict[tuple[int, datetime], tuple[int, int, datetime]] = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        stmt = (
            select(
                SlotMiss.id,
                SlotMiss.task_id,
                SlotMiss.first_at,
                SlotMiss.slot_count,
                SlotMiss.end_at,
                SlotMiss.manager_id,
                SlotMiss.recorded_at,
            )
            .where(
                SlotMiss.task_id.in_({k[0] for k in chunk}),
                SlotMiss.first_at.in_({k[1] for k in chunk}),
            )
            .with_for_update()
        )
        for row_id, task, first, slots, end, by, at in conn.execute(stmt):
            key = (task, first)
            if key not in rows:
                continue  # another key's task with this key's first slot
            if by == manager_id and at == now:
                inserted.add(key)
            else:
                existing[key] = (row_id, slots, end)
    counted: Counter[str] = Counter()
    for key in inserted:
        counted[str(rows[key]["reason"])] += int(rows[key]["slot_count"])
    for key, (row_id, slots, end) in existing.items():
        row = rows[key]
        wider = int(row["slot_count"])
        if wider > slots:  # a longer range from the same first slot: widen it
            conn.execute(
                update(SlotMiss)
                .where(SlotMiss.id == row_id)
                .values(end_at=max(end, row["end_at"]), slot_count=wider)
            )
            counted[str(row["reason"])] += wider - slots
    return counted
