"""Timer reconciliation: the three lists kept in agreement (DESIGN.md, "Timer reconciliation").

The three lists are the in-memory `TimerList` (what will fire), this manager's rows of
`ays_timer_list` (which timers are installed, with the schedule and version), and the task
table. One reconcile is:

  (a) memory vs rows: a timer with no row backing the same version is dropped from memory;
      a row with no timer backing it is deleted (after a restart, every row);
  (b) tasks vs rows: an enabled task with no row is added, one whose schedule, time zone or
      version differs is updated, a row whose task is disabled or gone is removed.

It is level-triggered, like a controller: whatever event was missed, the next tick repairs it.
Reading is three bulk queries (rows, tasks and, only for tasks being added, their last fired
slots); a tick with no difference writes nothing.

`plan()` does the reads and may run in a worker thread; `apply()` writes the rows (thread) and
`apply_to_memory()` changes the timer list (event loop thread only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import Engine, and_, bindparam, delete, func, insert, select, update

from ays_runtime.exceptions import ScheduleError
from ays_runtime.scheduler.schedule import parse_schedule
from ays_runtime.scheduler.timers import Timer, TimerList
from ays_runtime.storage.models import JobLog, MisfirePolicy, Task, TimerRow, TriggerKind

log = logging.getLogger("ays.reconcile")

_UPDATED = ("schedule", "timezone", "version", "next_fire_time", "updated_at")

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

    @property
    def writes(self) -> bool:
        return bool(self.delete_rows or self.insert_rows or self.update_rows)

    def __bool__(self) -> bool:
        return bool(self.actions)


class Reconciler:
    def __init__(self, engine: Engine, manager_id: str, misfire_grace: float) -> None:
        self.engine = engine
        self.manager_id = manager_id
        self.grace = timedelta(seconds=misfire_grace)

    def plan(self, memory: dict[int, int], now: datetime) -> Plan:
        """Compare `memory` ({task_id: version} of the timer list) with the database."""
        plan = Plan()
        with self.engine.connect() as conn:
            rows = {
                r.task_id: r
                for r in conn.execute(
                    select(
                        TimerRow.task_id, TimerRow.schedule, TimerRow.timezone, TimerRow.version
                    ).where(TimerRow.manager_id == self.manager_id)
                )
            }
            tasks = conn.execute(
                select(
                    Task.id,
                    Task.schedule,
                    Task.timezone,
                    Task.version,
                    Task.enabled,
                    Task.misfire_policy,
                )
            ).all()

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
            adding: list[tuple[Task, bool]] = []  # (task, is_new)
            for task in tasks:
                if not task.enabled:
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
                    plan.delete_rows.append(task_id)
                    plan.drop_timers.append(task_id)
                    plan.actions.append(Action("remove", task_id, "task is disabled or deleted"))
            last_fired = self._last_fired(conn, [t.id for t, new in adding if new])

        for task, is_new in adding:
            self._install(plan, task, is_new, last_fired.get(task.id), now)
        return plan

    def _install(
        self, plan: Plan, task: Task, is_new: bool, last: datetime | None, now: datetime
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
            elif task.misfire_policy == MisfirePolicy.FIRE_ONCE_NOW.value:
                missed = schedule.last_at_or_before(now, last)
                if missed is not None:
                    plan.misfires.append(Misfire(task.id, missed))
                    plan.actions.append(
                        Action("misfire", task.id, f"slot {missed.isoformat()} fires once now")
                    )
            else:
                plan.actions.append(
                    Action("misfire", task.id, f"slots since {expected.isoformat()} skipped")
                )
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
        what = "add" if is_new else "update"
        plan.actions.append(
            Action(
                what,
                task.id,
                f"version {task.version}, {task.schedule!r} {task.timezone}, "
                f"next {fire_at.isoformat()}",
            )
        )

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
        """Write the plan's row changes in one transaction."""
        if not plan.writes:
            return
        with self.engine.begin() as conn:
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

    @staticmethod
    def apply_to_memory(plan: Plan, timers: TimerList) -> None:
        for task_id in plan.drop_timers:
            timers.remove(task_id)
        for timer in plan.put_timers:
            timers.put(timer)


def memory_snapshot(timers: TimerList) -> dict[int, int]:
    return {t.task_id: t.version for t in timers}
