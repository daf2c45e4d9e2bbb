"""Timer reconciliation: the three lists kept in agreement (DESIGN.md, "Timer reconciliation").

The three lists are the in-memory `TimerList` (what will fire), this manager's rows of
`ays_timer_list` (which timers are installed, with the schedule and version), and the task
table. One reconcile is:

  (a) memory vs rows: a timer with no row backing the same version is dropped from memory;
      a row with no timer backing it is deleted (after a restart, every row);
  (b) tasks vs rows: an enabled task with no row is added, one whose schedule, time zone or
      version differs is updated, a row whose task is disabled or gone is removed.

It is level-triggered, like a controller: whatever event was missed, the next tick repairs it.
A tick with no difference writes nothing, and at 100k tasks it should not read 100k rows
either, so a tick first compares a fingerprint of memory with one of the rows (count, sums of
task ids, versions and a mix of both; computed by the database): when they agree, (a) has
nothing to do and (b) is one join returning only the tasks that differ from their row, plus
the rows whose task is gone. When they disagree (a restart, a failed write, rows edited by
hand) the tick reads both lists in full and compares them here. Either way, the tasks being
added get their last fired slot from a third query.

A task being added whose slots since its last fire (and since its last change, when the
manager that made it was up) were not fired, beyond the grace, had no manager running then:
the plan lists them as the slot ledger's `missed` ranges (scheduler/ledger.py), whatever its
misfire policy, and whether this is a start-up or a task enabled again. A task that never
fired has no range (nothing says since when it was owed); the common case costs nothing, as
the range is only looked for where the misfire policy applies.

With several live managers each reconciles only its share (scheduler/ownership.py): `plan`
is given the buckets this manager owns, tasks outside them count as not this manager's (their
rows and timers are removed, "moved"), and a task gained in a handover catches up the slots
no one fired since its last fire, within `catch_up` (the plan's `catch_up` fires).

`plan()` does the reads and may run in a worker thread; `apply()` writes the rows (thread) and
`apply_to_memory()` changes the timer list (event loop thread only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    and_,
    bindparam,
    delete,
    func,
    insert,
    not_,
    or_,
    select,
    true,
    update,
)

from ays_runtime.exceptions import ScheduleError
from ays_runtime.scheduler.ledger import DEFAULT_HORIZON, OwedRange, owed_range
from ays_runtime.scheduler.ownership import BUCKETS
from ays_runtime.scheduler.schedule import Schedule, parse_schedule
from ays_runtime.scheduler.timers import Timer, TimerList
from ays_runtime.storage.database import transaction
from ays_runtime.storage.models import JobLog, MisfirePolicy, Task, TimerRow, TriggerKind
from ays_runtime.vocabulary import SlotMissReason

log = logging.getLogger("ays.reconcile")

_UPDATED = ("schedule", "timezone", "version", "next_fire_time", "updated_at")
# The fingerprint's mixed term: task_id * version modulo a prime keeps every sum far below
# 2^63 (SQLite's SUM() raises on overflow) while a version moved between tasks still shows.
_MIX_PRIME = 1_000_003
_TASK_COLUMNS = (
    Task.id,
    Task.schedule,
    Task.timezone,
    Task.version,
    Task.enabled,
    Task.misfire_policy,
    Task.updated_at,
)

# Slots one task catches up after a handover: the window is seconds, so a few dozen at most
# for an every-second task; the bound keeps a sub-second `@every` from flooding the writer.
MAX_CATCH_UP = 100

ActionKind = Literal["drop-timer", "drop-row", "add", "update", "remove", "misfire", "invalid"]


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    task_id: int
    detail: str

    def __str__(self) -> str:
        return f"{self.kind:<10} task {self.task_id}: {self.detail}"


@dataclass(frozen=True)
class Misfire:
    """A slot missed while the manager was down, to be fired once now."""

    task_id: int
    scheduled_at: datetime


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    drop_timers: list[int] = field(default_factory=list)
    delete_rows: list[int] = field(default_factory=list)
    insert_rows: list[dict[str, object]] = field(default_factory=list)
    update_rows: list[dict[str, object]] = field(default_factory=list)
    put_timers: list[Timer] = field(default_factory=list)
    misfires: list[Misfire] = field(default_factory=list)
    # Slots of a task gained in a handover that no manager fired, later than the grace but
    # within the catch-up window: fired now as the cron slots they are.
    catch_up: list[Misfire] = field(default_factory=list)
    # Slots owed while no manager was running, for the slot ledger (not an action: a plan
    # with only these changes nothing).
    missed: list[OwedRange] = field(default_factory=list)
    # True when memory and the rows disagreed, so both lists were read in full.
    full_read: bool = False

    @property
    def writes(self) -> bool:
        return bool(self.delete_rows or self.insert_rows or self.update_rows)

    def __bool__(self) -> bool:
        return bool(self.actions)


class Reconciler:
    def __init__(
        self,
        engine: Engine,
        manager_id: str,
        misfire_grace: float,
        ledger_horizon: timedelta = DEFAULT_HORIZON,
    ) -> None:
        self.engine = engine
        self.manager_id = manager_id
        self.grace = timedelta(seconds=misfire_grace)
        self.horizon = ledger_horizon

    def plan(
        self,
        memory: dict[int, int],
        now: datetime,
        owned: frozenset[int] | None = None,
        catch_up: timedelta | None = None,
    ) -> Plan:
        """Compare `memory` ({task_id: version} of the timer list) with the database.

        `owned`: the buckets of this manager's share (None: every task); `catch_up`: how far
        back a task being added fires the slots no manager fired (default: the grace)."""
        with self.engine.connect() as conn:
            if self._rows_fingerprint(conn) == memory_fingerprint(memory):
                plan, adding = self._plan_from_differences(conn, owned)
            else:
                plan, adding = self._plan_in_full(conn, memory, owned)
            last_fired = self._last_fired(conn, [t.id for t, new in adding if new])
        window = max(catch_up or self.grace, self.grace)
        for task, is_new in adding:
            self._install(plan, task, is_new, last_fired.get(task.id), now, window)
        return plan

    def _rows_fingerprint(self, conn: Connection) -> tuple[int, int, int, int]:
        row = conn.execute(
            select(
                func.count(),
                func.coalesce(func.sum(TimerRow.task_id), 0),
                func.coalesce(func.sum(TimerRow.version), 0),
                func.coalesce(func.sum((TimerRow.task_id * TimerRow.version) % _MIX_PRIME), 0),
            ).where(TimerRow.manager_id == self.manager_id)
        ).one()
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])

    def _plan_from_differences(
        self, conn: Connection, owned: frozenset[int] | None
    ) -> tuple[Plan, list[tuple[Row, bool]]]:
        """(b) when memory and the rows agree: only the tasks that differ come back."""
        plan = Plan()
        mine = and_(TimerRow.task_id == Task.id, TimerRow.manager_id == self.manager_id)
        # A task with no schedule (fired only by its parents, ays_runtime.dependencies, or by
        # hand) has no timer, as a disabled one.
        in_share = true() if owned is None else (Task.id % BUCKETS).in_(sorted(owned))
        enabled = and_(Task.enabled.is_(True), Task.schedule != "", in_share)
        has_row = TimerRow.task_id.is_not(None)
        differs = or_(
            TimerRow.version != Task.version,
            # Byte for byte on MySQL too: the tables' collation is utf8mb4_bin (0001).
            TimerRow.schedule != Task.schedule,
            TimerRow.timezone != Task.timezone,
        )
        changed = conn.execute(
            select(*_TASK_COLUMNS, has_row.label("has_row"))
            .outerjoin(TimerRow, mine)
            .where(or_(and_(enabled, or_(not_(has_row), differs)), and_(not_(enabled), has_row)))
            .order_by(Task.id)
        ).all()
        adding: list[tuple[Row, bool]] = []
        for task in changed:
            if task.enabled and task.schedule and _in(owned, task.id):
                adding.append((task, not task.has_row))
            else:
                self._remove(plan, task.id, moved=bool(task.enabled))
        orphans = conn.execute(
            select(TimerRow.task_id)
            .outerjoin(Task, Task.id == TimerRow.task_id)
            .where(TimerRow.manager_id == self.manager_id, Task.id.is_(None))
            .order_by(TimerRow.task_id)
        ).scalars()
        for task_id in orphans:
            self._remove(plan, task_id)
        return plan, adding

    def _plan_in_full(
        self, conn: Connection, memory: dict[int, int], owned: frozenset[int] | None
    ) -> tuple[Plan, list[tuple[Row, bool]]]:
        """(a) and (b) on both lists read in full."""
        plan = Plan(full_read=True)
        rows = {
            r.task_id: r
            for r in conn.execute(
                select(
                    TimerRow.task_id, TimerRow.schedule, TimerRow.timezone, TimerRow.version
                ).where(TimerRow.manager_id == self.manager_id)
            )
        }
        tasks = conn.execute(select(*_TASK_COLUMNS).order_by(Task.id)).all()

        # (a) each side drops what the other does not back.
        for task_id, version in memory.items():
            row = rows.get(task_id)
            if row is None or row.version != version:
                plan.drop_timers.append(task_id)
                plan.actions.append(
                    Action("drop-timer", task_id, f"version {version} has no row backing it")
                )
        for task_id, row in list(rows.items()):
            if memory.get(task_id) != row.version:
                plan.delete_rows.append(task_id)
                plan.actions.append(
                    Action("drop-row", task_id, f"version {row.version} has no timer in memory")
                )
                del rows[task_id]

        # (b) all tasks vs the rows left: add, update, remove.
        enabled_ids: set[int] = set()
        moved: set[int] = set()
        adding: list[tuple[Row, bool]] = []  # (task, is_new)
        for task in tasks:
            if not task.enabled or not task.schedule:
                continue
            if not _in(owned, task.id):
                moved.add(task.id)
                continue
            enabled_ids.add(task.id)
            row = rows.get(task.id)
            if row is None:
                adding.append((task, True))
            elif (row.version, row.schedule, row.timezone) != (
                task.version,
                task.schedule,
                task.timezone,
            ):
                adding.append((task, False))
        for task_id in rows:
            if task_id not in enabled_ids:
                self._remove(plan, task_id, moved=task_id in moved)
        return plan, adding

    @staticmethod
    def _remove(plan: Plan, task_id: int, moved: bool = False) -> None:
        plan.delete_rows.append(task_id)
        plan.drop_timers.append(task_id)
        why = (
            "task is owned by another live manager now" if moved else "task is disabled or deleted"
        )
        plan.actions.append(Action("remove", task_id, why))

    def _install(
        self,
        plan: Plan,
        task: Row,
        is_new: bool,
        last: datetime | None,
        now: datetime,
        window: timedelta,
    ) -> None:
        try:
            schedule = parse_schedule(task.schedule, task.timezone)
        except ScheduleError as err:
            # A task edited behind the API's back: leave it uninstalled, say so every tick.
            plan.actions.append(Action("invalid", task.id, str(err)))
            if not is_new:
                plan.delete_rows.append(task.id)
                plan.drop_timers.append(task.id)
            return
        fire_at = schedule.next_after(now)
        if is_new and last is not None:
            expected = schedule.next_after(last)
            if expected >= now - self.grace:
                fire_at = min(fire_at, expected)  # late by less than the grace: still fire it
            elif expected >= now - window:
                # A task gained in a handover: its slots since the last fire, nobody's meanwhile.
                fire_at = min(fire_at, self._catch_up(plan, task, schedule, expected, now))
            else:
                fired_once = None
                if task.misfire_policy == MisfirePolicy.FIRE_ONCE_NOW.value:
                    fired_once = schedule.last_at_or_before(now, last)
                    if fired_once is not None:
                        plan.misfires.append(Misfire(task.id, fired_once))
                        plan.actions.append(
                            Action(
                                "misfire", task.id, f"slot {fired_once.isoformat()} fires once now"
                            )
                        )
                else:
                    plan.actions.append(
                        Action("misfire", task.id, f"slots since {expected.isoformat()} skipped")
                    )
                self._note_missed(plan, task, schedule, expected, fired_once or fire_at, now)
        # A slot this plan found owed and already due is fired by the plan, not left to a timer:
        # the fire loop judges a timer against the grace when it pops it, moments after the
        # plan's `now`, and would skip a slot owed by a hair (a handover at the grace's edge).
        caught = 0
        while fire_at <= now and caught < MAX_CATCH_UP:
            plan.catch_up.append(Misfire(task.id, fire_at))
            fire_at = schedule.next_after(fire_at)
            caught += 1
        values = {
            "manager_id": self.manager_id,
            "task_id": task.id,
            "schedule": task.schedule,
            "timezone": task.timezone,
            "version": task.version,
            "next_fire_time": fire_at,
            "updated_at": now,
        }
        (plan.insert_rows if is_new else plan.update_rows).append(values)
        plan.put_timers.append(
            Timer(
                task_id=task.id,
                version=task.version,
                schedule=schedule,
                timezone=task.timezone,
                misfire_policy=task.misfire_policy,
                fire_at=fire_at,
            )
        )
        what: ActionKind = "add" if is_new else "update"
        plan.actions.append(
            Action(
                what,
                task.id,
                f"version {task.version}, {task.schedule!r} {task.timezone}, "
                f"next {fire_at.isoformat()}",
            )
        )

    def _catch_up(
        self, plan: Plan, task: Row, schedule: Schedule, expected: datetime, now: datetime
    ) -> datetime:
        """Fire the slots from `expected` that are later than the grace (at most
        MAX_CATCH_UP; not those before the task's last change, when it may have been
        disabled); the first slot left to the timer."""
        slot = expected
        if task.updated_at is not None and task.updated_at >= expected:
            slot = schedule.next_after(task.updated_at)
        caught = 0
        while slot < now - self.grace and caught < MAX_CATCH_UP:
            plan.catch_up.append(Misfire(task.id, slot))
            slot = schedule.next_after(slot)
            caught += 1
        if caught:
            plan.actions.append(
                Action(
                    "misfire", task.id, f"{caught} slot(s) since {expected.isoformat()} fire late"
                )
            )
        return slot

    def _note_missed(
        self,
        plan: Plan,
        task: Row,
        schedule: Schedule,
        expected: datetime,
        end: datetime,
        now: datetime,
    ) -> None:
        """The slots from `expected` (the first after the task's last fire, later than the
        grace) up to `end` that no manager fired; from the task's last change when that is
        later (a manager was up to make it; before it, the task may have been disabled)."""
        first = expected
        if task.updated_at is not None and task.updated_at >= expected:
            first = schedule.next_after(task.updated_at)
            if first >= now - self.grace:
                return
        owed = owed_range(task.id, schedule, first, end, SlotMissReason.MISSED, now, self.horizon)
        if owed is not None:
            plan.missed.append(owed)

    def _last_fired(self, conn: object, task_ids: list[int]) -> dict[int, datetime]:
        """The latest scheduled slot each task fired, for the misfire decision."""
        if not task_ids:
            return {}
        result: dict[int, datetime] = {}
        kinds = (TriggerKind.CRON.value, TriggerKind.MISFIRE.value)
        for start in range(0, len(task_ids), 5000):
            chunk = task_ids[start : start + 5000]
            stmt = (
                select(JobLog.task_id, func.max(JobLog.scheduled_at))
                .where(JobLog.task_id.in_(chunk), JobLog.trigger.in_(kinds))
                .group_by(JobLog.task_id)
            )
            result.update({tid: ts for tid, ts in conn.execute(stmt)})  # type: ignore[attr-defined]
        return result

    def apply(self, plan: Plan) -> None:
        """Write the plan's row changes in one transaction, written again from the start
        when a transient error (a deadlock with a peer's timer rows) rolled it back."""
        if not plan.writes:
            return

        def write(conn: Connection) -> None:
            mine = TimerRow.manager_id == self.manager_id
            for start in range(0, len(plan.delete_rows), 5000):
                chunk = plan.delete_rows[start : start + 5000]
                conn.execute(delete(TimerRow).where(and_(mine, TimerRow.task_id.in_(chunk))))
            if plan.insert_rows:
                conn.execute(insert(TimerRow), plan.insert_rows)
            if plan.update_rows:
                stmt = (
                    update(TimerRow)
                    .where(TimerRow.manager_id == bindparam("b_manager_id"))
                    .where(TimerRow.task_id == bindparam("b_task_id"))
                    .values({k: bindparam(k) for k in _UPDATED})
                )
                conn.execute(
                    stmt,
                    [
                        {"b_manager_id": v["manager_id"], "b_task_id": v["task_id"]}
                        | {k: v[k] for k in _UPDATED}
                        for v in plan.update_rows
                    ],
                )

        transaction(self.engine, write, f"manager {self.manager_id}: writing its timers")

    @staticmethod
    def apply_to_memory(plan: Plan, timers: TimerList) -> None:
        for task_id in plan.drop_timers:
            timers.remove(task_id)
        for timer in plan.put_timers:
            timers.put(timer)


def _in(owned: frozenset[int] | None, task_id: int) -> bool:
    return owned is None or task_id % BUCKETS in owned


def memory_snapshot(timers: TimerList) -> dict[int, int]:
    return {t.task_id: t.version for t in timers}


def memory_fingerprint(memory: dict[int, int]) -> tuple[int, int, int, int]:
    """What `_rows_fingerprint` reads when the rows hold exactly `memory`."""
    return (
        len(memory),
        sum(memory),
        sum(memory.values()),
        sum((task_id * version) % _MIX_PRIME for task_id, version in memory.items()),
    )
