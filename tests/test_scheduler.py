"""The scheduling center's core: reconciliation of the three lists, slot claiming, misfires.

Every test runs on SQLite and on MariaDB (the `engine` fixture)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, delete, event, func, insert, select, update

from ays_runtime.scheduler.firing import Fire, claim_slots
from ays_runtime.scheduler.reconcile import Reconciler, memory_snapshot
from ays_runtime.scheduler.scheduler import Scheduler
from ays_runtime.scheduler.timers import TimerList
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import JobLog, NodeGroup, Task, TimerRow, TriggerKind
from ays_runtime.transport.base import JobDispatch

MANAGER = "127.0.0.1:18080"


def add_task(engine: Engine, name: str, schedule: str = "*/5 * * * * *", **extra: object) -> int:
    now = utcnow()
    with engine.begin() as conn:
        if conn.execute(select(NodeGroup.id).where(NodeGroup.name == "g")).first() is None:
            conn.execute(
                insert(NodeGroup).values(name="g", description="", created_at=now, updated_at=now)
            )
        values = {
            "name": name,
            "description": "",
            "node_group": "g",
            "schedule": schedule,
            "timezone": "UTC",
            "task_type": "shell",
            "payload": {"command": "true"},
            "params": "",
            "created_at": now,
            "updated_at": now,
        } | extra
        return conn.execute(insert(Task).values(**values)).inserted_primary_key[0]


def change_task(engine: Engine, task_id: int, **values: object) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(Task).where(Task.id == task_id).values(version=Task.version + 1, **values)
        )


def timer_rows(engine: Engine) -> dict[int, int]:
    with engine.connect() as conn:
        return dict(
            conn.execute(
                select(TimerRow.task_id, TimerRow.version).where(TimerRow.manager_id == MANAGER)
            ).all()
        )


def reconcile(engine: Engine, timers: TimerList, now: datetime | None = None) -> list[str]:
    rec = Reconciler(engine, MANAGER, misfire_grace=5)
    plan = rec.plan(memory_snapshot(timers), now or utcnow())
    rec.apply(plan)
    Reconciler.apply_to_memory(plan, timers)
    return [a.kind for a in plan.actions]


@pytest.fixture
def writes(engine: Engine) -> Iterator[list[str]]:
    """Every INSERT/UPDATE/DELETE statement the engine runs."""
    seen: list[str] = []

    def record(_conn, _cursor, statement: str, *_args: object) -> None:  # noqa: ANN001
        if statement.lstrip().split(" ", 1)[0].upper() in {"INSERT", "UPDATE", "DELETE"}:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def test_a_new_enabled_task_gets_a_timer_and_a_row(engine: Engine) -> None:
    timers = TimerList()
    task = add_task(engine, "a")
    assert reconcile(engine, timers) == ["add"]
    assert task in timers and timer_rows(engine) == {task: 1}


def test_a_tick_with_no_change_writes_nothing(engine: Engine, writes: list[str]) -> None:
    timers = TimerList()
    for i in range(20):
        add_task(engine, f"t{i}")
    reconcile(engine, timers)
    writes.clear()
    assert reconcile(engine, timers) == []
    assert writes == []


def test_an_edited_schedule_updates_the_timer_and_its_row(engine: Engine) -> None:
    timers = TimerList()
    task = add_task(engine, "a", "0 0 * * * *")
    reconcile(engine, timers)
    change_task(engine, task, schedule="*/2 * * * * *")
    assert reconcile(engine, timers) == ["update"]
    timer = timers.get(task)
    assert timer is not None and timer.version == 2
    assert timer.schedule.expression == "*/2 * * * * *"
    assert timer_rows(engine) == {task: 2}


def test_a_disabled_task_loses_its_timer_and_row(engine: Engine) -> None:
    timers = TimerList()
    task = add_task(engine, "a")
    reconcile(engine, timers)
    change_task(engine, task, enabled=False)
    assert reconcile(engine, timers) == ["remove"]
    assert task not in timers and timer_rows(engine) == {}


def test_a_deleted_task_loses_its_timer_and_row(engine: Engine) -> None:
    timers = TimerList()
    task = add_task(engine, "a")
    reconcile(engine, timers)
    with engine.begin() as conn:
        conn.execute(delete(Task).where(Task.id == task))
    assert reconcile(engine, timers) == ["remove"]
    assert task not in timers and timer_rows(engine) == {}


def test_a_row_with_no_timer_in_memory_after_a_restart_is_dropped_then_reinstalled(
    engine: Engine,
) -> None:
    task = add_task(engine, "a")
    reconcile(engine, TimerList())  # the manager that wrote the row is gone
    restarted = TimerList()
    assert reconcile(engine, restarted) == ["drop-row", "add"]
    assert task in restarted and timer_rows(engine) == {task: 1}


def test_a_timer_whose_row_was_removed_is_dropped_then_reinstalled(engine: Engine) -> None:
    timers = TimerList()
    task = add_task(engine, "a")
    reconcile(engine, timers)
    with engine.begin() as conn:
        conn.execute(delete(TimerRow))
    assert reconcile(engine, timers) == ["drop-timer", "add"]
    assert task in timers and timer_rows(engine) == {task: 1}


def test_a_task_with_a_bad_schedule_in_the_database_is_reported_not_installed(
    engine: Engine,
) -> None:
    timers = TimerList()
    task = add_task(engine, "a", "not a schedule")
    assert reconcile(engine, timers) == ["invalid"]
    assert task not in timers and timer_rows(engine) == {}


def test_a_duplicate_slot_is_refused(engine: Engine) -> None:
    task = add_task(engine, "a")
    slot = datetime(2026, 1, 1, 0, 0, 5)
    first = claim_slots(engine, MANAGER, [Fire(task, slot)], utcnow())
    again = claim_slots(engine, "other:1", [Fire(task, slot), Fire(task, slot)], utcnow())
    assert [d.task_id for d in first] == [task] and again == []
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(JobLog)).scalar() == 1


def _with_last_fire(engine: Engine, policy: str, down_for: timedelta) -> tuple[int, datetime]:
    task = add_task(engine, "a", "*/10 * * * * *", misfire_policy=policy)
    now = datetime(2026, 5, 1, 12, 0, 3)
    claim_slots(engine, MANAGER, [Fire(task, now - down_for)], now - down_for)
    return task, now


def test_misfire_policy_skip_drops_the_slots_missed_while_down(engine: Engine) -> None:
    task, now = _with_last_fire(engine, "skip", timedelta(seconds=63))
    timers = TimerList()
    assert reconcile(engine, timers, now) == ["misfire", "add"]
    timer = timers.get(task)
    assert timer is not None and timer.fire_at == datetime(2026, 5, 1, 12, 0, 10)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(JobLog)).scalar() == 1


def test_misfire_policy_fire_once_now_fires_the_latest_missed_slot_once(engine: Engine) -> None:
    task, now = _with_last_fire(engine, "fire_once_now", timedelta(seconds=63))
    got: list[JobDispatch] = []

    async def on_claimed(jobs: list[JobDispatch]) -> None:
        got.extend(jobs)

    async def main() -> None:
        scheduler = Scheduler(engine, MANAGER, on_claimed, clock=lambda: now)
        runner = asyncio.create_task(scheduler.writer.run())
        await scheduler.reconcile_now()
        scheduler.writer.close()
        await asyncio.wait_for(runner, 10)

    asyncio.run(main())
    assert [(j.task_id, j.scheduled_at, j.trigger) for j in got] == [
        (task, datetime(2026, 5, 1, 12, 0, 0), TriggerKind.MISFIRE.value)
    ]


def test_a_restart_within_the_grace_fires_the_due_slot_late_instead_of_skipping(
    engine: Engine,
) -> None:
    task, now = _with_last_fire(engine, "skip", timedelta(seconds=13))  # last 11:59:50
    timers = TimerList()
    assert reconcile(engine, timers, now) == ["add"]
    timer = timers.get(task)
    assert timer is not None and timer.fire_at == datetime(2026, 5, 1, 12, 0, 0)


def test_a_timer_late_beyond_the_grace_follows_its_misfire_policy(engine: Engine) -> None:
    skip = add_task(engine, "skip", "* * * * * *", misfire_policy="skip")
    once = add_task(engine, "once", "* * * * * *", misfire_policy="fire_once_now")

    async def main() -> list[Fire]:
        async def on_claimed(_jobs: list[JobDispatch]) -> None:
            return None

        t0 = datetime(2026, 5, 1, 12, 0, 0, 500000)
        scheduler = Scheduler(engine, MANAGER, on_claimed, misfire_grace=5, clock=lambda: t0)
        await scheduler.reconcile_now()  # timers due 12:00:01
        submitted = scheduler.fire_due(t0 + timedelta(seconds=60))  # a 60 s stall
        assert submitted == 1
        return list(scheduler.writer._queue)

    fires = asyncio.run(main())
    assert [(f.task_id, f.scheduled_at, f.trigger) for f in fires] == [
        (once, datetime(2026, 5, 1, 12, 1, 0), "misfire")
    ]
    assert skip != once


def test_the_scheduler_fires_every_slot_once_and_stops_cleanly(engine: Engine) -> None:
    task = add_task(engine, "every", "@every 200ms")
    got: list[JobDispatch] = []

    async def on_claimed(jobs: list[JobDispatch]) -> None:
        got.extend(jobs)

    async def main() -> None:
        scheduler = Scheduler(engine, MANAGER, on_claimed, reconcile_interval=0.5)
        runner = asyncio.create_task(scheduler.run())
        await asyncio.sleep(1.5)
        scheduler.stop()
        await asyncio.wait_for(runner, 10)

    asyncio.run(main())
    slots = [j.scheduled_at for j in got if j.task_id == task]
    assert len(slots) >= 4
    assert len(set(slots)) == len(slots)
    steps = {b - a for a, b in zip(slots, slots[1:], strict=False)}
    assert steps == {timedelta(milliseconds=200)}  # no slot skipped, none doubled
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(JobLog)).scalar() == len(slots)
