"""The scheduling center's core: reconciliation of the three lists, slot claiming, misfires.

Every test that touches the database runs on SQLite and on MariaDB (the `engine` fixture)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, delete, event, func, insert, select, update

from ays_runtime.exceptions import ScheduleError
from ays_runtime.metrics import manager as metrics
from ays_runtime.scheduler import firing
from ays_runtime.scheduler.firing import Fire, claim_slots
from ays_runtime.scheduler.reconcile import Reconciler, memory_snapshot
from ays_runtime.scheduler.schedule import parse_schedule
from ays_runtime.scheduler.scheduler import Scheduler
from ays_runtime.scheduler.timers import Timer, TimerList
from ays_runtime.storage.database import transaction, utcnow
from ays_runtime.storage.models import JobLog, NodeGroup, SlotMiss, Task, TimerRow, TriggerKind
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


def test_a_row_whose_version_was_edited_by_hand_is_dropped_with_its_timer_then_reinstalled(
    engine: Engine,
) -> None:
    timers = TimerList()
    task = add_task(engine, "a")
    other = add_task(engine, "b")
    reconcile(engine, timers)
    with engine.begin() as conn:  # the sums stay equal; the mixed term does not
        conn.execute(update(TimerRow).where(TimerRow.task_id == task).values(version=2))
        conn.execute(update(TimerRow).where(TimerRow.task_id == other).values(version=0))
    assert sorted(reconcile(engine, timers)) == sorted(
        ["drop-timer", "drop-timer", "drop-row", "drop-row", "add", "add"]
    )
    assert timer_rows(engine) == {task: 1, other: 1}
    assert {t.task_id: t.version for t in timers} == {task: 1, other: 1}


def test_a_tick_with_no_change_reads_no_list_in_full_and_a_restart_does(engine: Engine) -> None:
    timers = TimerList()
    for i in range(20):
        add_task(engine, f"t{i}")
    rec = Reconciler(engine, MANAGER, misfire_grace=5)
    first = rec.plan(memory_snapshot(timers), utcnow())
    assert first.full_read is False  # no rows, no timers: they agree
    rec.apply(first)
    Reconciler.apply_to_memory(first, timers)
    again = rec.plan(memory_snapshot(timers), utcnow())
    assert (again.full_read, again.actions) == (False, [])
    restarted = rec.plan(memory_snapshot(TimerList()), utcnow())
    assert restarted.full_read is True
    assert [a.kind for a in restarted.actions].count("drop-row") == 20


def test_a_schedule_changed_only_in_letter_case_behind_the_api_is_updated(
    engine: Engine,
) -> None:
    """A case-folding collation would find 'MON' equal to 'mon' (the tables are utf8mb4_bin)."""
    timers = TimerList()
    task = add_task(engine, "a", "0 0 9 * * mon")
    reconcile(engine, timers)
    with engine.begin() as conn:  # no version bump: edited in the database
        conn.execute(update(Task).where(Task.id == task).values(schedule="0 0 9 * * MON"))
    assert reconcile(engine, timers) == ["update"]
    with engine.connect() as conn:
        stored = conn.scalar(select(TimerRow.schedule).where(TimerRow.task_id == task))
    assert stored == "0 0 9 * * MON"


def test_a_task_with_a_bad_schedule_in_the_database_is_reported_not_installed(
    engine: Engine,
) -> None:
    timers = TimerList()
    task = add_task(engine, "a", "not a schedule")
    assert reconcile(engine, timers) == ["invalid"]
    assert task not in timers and timer_rows(engine) == {}


SECONDS = "second field's step must be 1 to 59 (second runs 0-59)"
MINUTES = "minute field's step must be 1 to 59 (minute runs 0-59)"
HOURS = "hour field's step must be 1 to 23 (hour runs 0-23)"
MONTHS = "month field's step must be 1 to 11 (month runs 1-12)"
WEEKDAYS = "day of week field's step must be 1 to 6 (day of week runs 0-6)"


@pytest.mark.parametrize(
    ("expression", "rule", "bad"),
    [
        ("*/61 * * * * *", SECONDS, "'*/61' steps by 61"),
        ("*/60 * * * * *", SECONDS, "'*/60' steps by 60"),
        ("*/0 * * * * *", SECONDS, "'*/0' steps by 0"),
        ("5/70 * * * * *", SECONDS, "'5/70' steps by 70"),
        ("*/5,10-20/90 * * * * *", SECONDS, "'10-20/90' steps by 90"),
        ("0 */61 * * * *", MINUTES, "'*/61' steps by 61"),
        ("*/61 * * * *", MINUTES, "'*/61' steps by 61"),  # 5 fields: the first is the minute
        ("0 0 */24 * * *", HOURS, "'*/24' steps by 24"),
        ("0 */25 * * *", HOURS, "'*/25' steps by 25"),
        (
            "0 0 0 */31 * *",
            "day of month field's step must be 1 to 30 (day of month runs 1-31)",
            "'*/31' steps by 31",
        ),
        ("0 0 0 1 */12 *", MONTHS, "'*/12' steps by 12"),
        ("0 0 0 1 JAN-DEC/13 *", MONTHS, "'JAN-DEC/13' steps by 13"),
        ("0 0 0 * * */7", WEEKDAYS, "'*/7' steps by 7"),
        ("0 0 0 * * MON-FRI/7", WEEKDAYS, "'MON-FRI/7' steps by 7"),
    ],
)
def test_a_cron_step_that_cannot_fire_twice_in_its_field_is_refused_naming_the_field(
    expression: str, rule: str, bad: str
) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(expression)
    assert (caught.value.field, caught.value.value) == ("schedule", expression)
    assert str(caught.value) == f"schedule: {expression!r} is not valid: the {rule}; {bad}"


@pytest.mark.parametrize(
    ("expression", "after", "slots"),
    [
        ("*/59 * * * * *", "12:00:00", ["12:00:59", "12:01:00", "12:01:59"]),
        ("*/59 * * * *", "12:00:00", ["12:59:00", "13:00:00", "13:59:00"]),  # 5 fields: minutes
        ("0 */25 * * * *", "12:00:00", ["12:25:00", "12:50:00", "13:00:00"]),
        ("0 0 */23 * * *", "00:00:00", ["23:00:00", "00:00:00", "23:00:00"]),
        ("0-10/20 * * * * *", "12:00:00", ["12:01:00", "12:02:00", "12:03:00"]),
    ],
)
def test_a_cron_step_up_to_its_fields_span_fires_as_written(
    expression: str, after: str, slots: list[str]
) -> None:
    schedule = parse_schedule(expression)
    got, moment = [], datetime.fromisoformat(f"2026-05-01T{after}")
    for _ in slots:
        moment = schedule.next_after(moment)
        got.append(moment.time().isoformat())
    assert got == slots


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
    """Found by the suite beside two copies of itself: a slot the reconcile finds owed by a
    hair (late by the grace exactly) is fired even when the fire loop only runs once the
    grace has passed; it was left to a timer that the loop then judged late and skipped."""
    task, now = _with_last_fire(engine, "skip", timedelta(seconds=8))  # last 11:59:55
    plan_at = datetime(2026, 5, 1, 12, 0, 5)  # 12:00:00 late by the 5 s grace exactly
    clock = [plan_at]
    got: list[JobDispatch] = []

    async def on_claimed(jobs: list[JobDispatch]) -> None:
        got.extend(jobs)

    async def main() -> None:
        scheduler = Scheduler(engine, MANAGER, on_claimed, misfire_grace=5, clock=lambda: clock[0])
        runner = asyncio.create_task(scheduler.writer.run())
        await scheduler.reconcile_now()
        clock[0] = plan_at + timedelta(milliseconds=10)  # the fire loop's turn comes after
        scheduler.fire_due(clock[0])
        timer = scheduler.timers.get(task)
        assert timer is not None and timer.fire_at == datetime(2026, 5, 1, 12, 0, 10)
        scheduler.writer.close()
        await asyncio.wait_for(runner, 10)

    asyncio.run(main())
    assert [(j.task_id, j.scheduled_at, j.trigger) for j in got] == [
        (task, datetime(2026, 5, 1, 12, 0, 0), TriggerKind.CRON.value)
    ]


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


def test_a_shared_cron_schedule_answers_threads_asking_at_once_as_it_answers_one() -> None:
    # The console's forecast and slot view ask the scheduler's cached schedules from threads.
    shared = parse_schedule("*/7 */3 * * * *", "Europe/Berlin")
    start = datetime(2026, 3, 29, 0, 0, 0)  # a summer-time change in the range
    moments = [start + timedelta(seconds=13 * i) for i in range(3000)]
    alone = parse_schedule.__wrapped__("*/7 */3 * * * *", "Europe/Berlin")
    expected = [alone.next_after(m) for m in moments]
    answers: dict[int, list[datetime]] = {}

    def ask(worker: int) -> None:
        order = moments[worker::4] + moments[:worker]  # each thread walks its own way
        answers[worker] = [shared.next_after(m) for m in order]

    threads = [threading.Thread(target=ask, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for worker in range(4):
        order = moments[worker::4] + moments[:worker]
        want = [expected[moments.index(m)] for m in order]
        assert answers[worker] == want, worker


# --- the slot ledger: slots not fired, as ranges (scheduler/ledger.py) ----------------------


def owed_rows(engine: Engine) -> list[tuple[int, datetime, datetime, int, str, str]]:
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                select(
                    SlotMiss.task_id,
                    SlotMiss.first_at,
                    SlotMiss.end_at,
                    SlotMiss.slot_count,
                    SlotMiss.reason,
                    SlotMiss.manager_id,
                ).order_by(SlotMiss.task_id, SlotMiss.first_at)
            )
        ]


def start_managers(engine: Engine, clocks: dict[str, datetime], horizon: float = 86400) -> None:
    """Managers `clocks` (id: its now) starting together: each reconciles, and its claim
    writer writes what it found."""

    async def one(manager_id: str, now: datetime) -> None:
        async def on_claimed(_jobs: list[JobDispatch]) -> None:
            return None

        scheduler = Scheduler(
            engine, manager_id, on_claimed, clock=lambda: now, ledger_horizon=horizon
        )
        runner = asyncio.create_task(scheduler.writer.run())
        await scheduler.reconcile_now()
        scheduler.writer.close()
        await asyncio.wait_for(runner, 30)

    async def main() -> None:
        await asyncio.gather(*(one(m, now) for m, now in clocks.items()))

    asyncio.run(main())


@pytest.mark.parametrize("policy", ["skip", "fire_once_now"])
def test_a_restart_records_the_slots_no_manager_fired_as_one_missed_range(
    engine: Engine, policy: str
) -> None:
    t0 = datetime(2026, 5, 1, 12, 0, 0)
    task = add_task(engine, "a", "*/5 * * * * *", misfire_policy=policy, updated_at=t0)
    claim_slots(engine, MANAGER, [Fire(task, t0 + timedelta(seconds=10))], t0)
    now = datetime(2026, 5, 1, 12, 1, 2, 300000)  # down from 12:00:10 to 12:01:02
    before = metric_value("missed")
    start_managers(engine, {MANAGER: now})
    # Slots 12:00:15 .. 12:01:00 owed; skip resumes at 12:01:05, fire_once_now fires 12:01:00.
    end = datetime(2026, 5, 1, 12, 1, 5 if policy == "skip" else 0)
    count = 10 if policy == "skip" else 9
    assert owed_rows(engine) == [
        (task, datetime(2026, 5, 1, 12, 0, 15), end, count, "missed", MANAGER)
    ]
    assert metric_value("missed") - before == count
    start_managers(engine, {MANAGER: now})  # found again: recorded once, counted once
    assert len(owed_rows(engine)) == 1 and metric_value("missed") - before == count


def test_two_managers_starting_together_record_a_missed_range_once(engine: Engine) -> None:
    t0 = datetime(2026, 5, 1, 12, 0, 0)
    task = add_task(engine, "a", "* * * * * *", updated_at=t0)
    claim_slots(engine, MANAGER, [Fire(task, t0)], t0)
    now = datetime(2026, 5, 1, 12, 10, 0, 200000)
    # Their clocks differ, and the look-back (60 s) clips the 10 minutes: still one range.
    start_managers(
        engine, {"10.0.0.1:18080": now, "10.0.0.2:18080": now + timedelta(seconds=0.7)}, horizon=60
    )
    rows = owed_rows(engine)
    assert len(rows) == 1
    first, end = rows[0][1], rows[0][2]
    assert now - timedelta(seconds=61) <= first <= now - timedelta(seconds=59)
    assert end in (datetime(2026, 5, 1, 12, 10, 1), datetime(2026, 5, 1, 12, 10, 2))
    assert rows[0][3] == (end - first).seconds


def test_a_task_enabled_again_or_created_records_no_missed_slot(engine: Engine) -> None:
    now = utcnow()
    old = now - timedelta(hours=1)
    task = add_task(engine, "a", "* * * * * *", updated_at=now - timedelta(seconds=0.5))
    claim_slots(engine, MANAGER, [Fire(task, old)], old)  # fired an hour ago, then disabled
    add_task(engine, "new", "* * * * * *", updated_at=now - timedelta(seconds=0.5))
    start_managers(engine, {MANAGER: now})
    assert owed_rows(engine) == []


def test_a_timer_late_beyond_the_grace_with_policy_skip_records_a_skipped_range(
    engine: Engine,
) -> None:
    skip = add_task(engine, "skip", "* * * * * *", misfire_policy="skip")
    add_task(engine, "once", "* * * * * *", misfire_policy="fire_once_now")
    before = metric_value("skipped")

    async def main() -> None:
        async def on_claimed(_jobs: list[JobDispatch]) -> None:
            return None

        t0 = datetime(2026, 5, 1, 12, 0, 0, 500000)
        scheduler = Scheduler(engine, MANAGER, on_claimed, misfire_grace=5, clock=lambda: t0)
        runner = asyncio.create_task(scheduler.writer.run())
        await scheduler.reconcile_now()  # timers due 12:00:01
        scheduler.fire_due(t0 + timedelta(seconds=60))  # a 60 s stall
        scheduler.writer.close()
        await asyncio.wait_for(runner, 30)

    asyncio.run(main())
    # 12:00:01 .. 12:01:00 passed; the timer resumes at 12:01:01. fire_once_now's slots are
    # folded into its one fire (the job log shows them), not recorded.
    assert owed_rows(engine) == [
        (
            skip,
            datetime(2026, 5, 1, 12, 0, 1),
            datetime(2026, 5, 1, 12, 1, 1),
            60,
            "skipped",
            MANAGER,
        )
    ]
    assert metric_value("skipped") - before == 60


def metric_value(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value("ays_slots_missed_total", {"reason": reason})
    return value or 0.0


def test_a_claim_stores_params_and_manager_id_exactly_as_written(engine: Engine) -> None:
    """The claim renders its rows as SQL text on MySQL: quotes, backslashes, "%" and
    non-ASCII must come back unchanged, on both backends."""
    task = add_task(engine, "a")
    odd = '50%s %% it\'s a \\ "q" %(x)s ünï'
    slot = datetime(2026, 1, 1, 0, 0, 5, 250)
    [job] = claim_slots(engine, "m'%s", [Fire(task, slot, params=odd, due_at=slot)], utcnow())
    assert (job.params, job.scheduled_at) == (odd, slot)
    with engine.connect() as conn:
        row = conn.execute(
            select(JobLog.params, JobLog.manager_id, JobLog.scheduled_at, JobLog.due_at)
        ).one()
    assert tuple(row) == (odd, "m'%s", slot, slot)


def test_a_cached_task_is_fired_as_it_is_now(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim writer keeps tasks' fields between batches: a change (a new version), a
    disable (read fresh) and a delete are seen by the next batch. Small chunks make one
    batch several statements."""
    monkeypatch.setattr(firing, "INSERT_CHUNK", 2)
    monkeypatch.setattr(firing, "ID_CHUNK", 2)
    tasks = [add_task(engine, f"t{i}") for i in range(5)]
    cache = firing.TaskCache()
    t0 = datetime(2026, 1, 1, 0, 0, 0)

    def claim(fires: list[Fire]) -> list[JobDispatch]:
        return transaction(
            engine, lambda conn: firing.claim_in(conn, MANAGER, fires, utcnow(), cache), "test"
        )

    first = claim([Fire(t, t0) for t in tasks])
    assert sorted(d.task_id for d in first) == tasks
    assert len({d.job_log_id for d in first}) == 5
    change_task(engine, tasks[0], payload={"command": "echo changed"}, params="p2")
    with engine.begin() as conn:  # disabled without a new version: the flag is read fresh
        conn.execute(update(Task).where(Task.id == tasks[1]).values(enabled=False))
        conn.execute(delete(Task).where(Task.id == tasks[2]))
    t1 = t0 + timedelta(seconds=1)
    second = claim([Fire(t, t1) for t in tasks] + [Fire(tasks[1], t1, TriggerKind.MANUAL.value)])
    by_task = {(d.task_id, d.trigger): d for d in second}
    assert set(by_task) == {
        (tasks[0], "cron"),
        (tasks[1], "manual"),
        (tasks[3], "cron"),
        (tasks[4], "cron"),
    }
    changed = by_task[(tasks[0], "cron")]
    assert (changed.payload, changed.params) == ({"command": "echo changed"}, "p2")
    again = claim([Fire(t, t1) for t in tasks])
    assert again == []  # every slot of t1 is taken: none twice


def test_a_batch_larger_than_mysqls_default_group_concat_is_claimed_whole(
    engine: Engine,
) -> None:
    """The rows won come back as one group_concat string, which MySQL cuts at 1,024 bytes
    unless the claim raises the limit: 300 rows are ~13 KB."""
    tasks = [add_task(engine, f"t{i}") for i in range(300)]
    slot = datetime(2026, 1, 1, 0, 0, 0)
    won = claim_slots(engine, MANAGER, [Fire(t, slot) for t in tasks], utcnow())
    assert sorted(d.task_id for d in won) == tasks
    assert len({d.job_log_id for d in won}) == 300


# -- claiming ahead (manager.claim_ahead) ---------------------------------------------------


def test_runs_claimed_ahead_are_sent_at_their_slot_each_once_and_all_of_them_at_a_stop(
    engine: Engine,
) -> None:
    task = add_task(engine, "ahead", "* * * * * *")
    handed: list[tuple[JobDispatch, datetime]] = []

    async def on_claimed(jobs: list[JobDispatch]) -> None:
        now = utcnow()
        handed.extend((job, now) for job in jobs)

    async def main() -> None:
        scheduler = Scheduler(engine, MANAGER, on_claimed, claim_ahead=2.0)
        runner = asyncio.create_task(scheduler.run())
        deadline = utcnow() + timedelta(seconds=60)
        while len(handed) < 3 and utcnow() < deadline:
            await asyncio.sleep(0.05)
        scheduler.stop()  # with slots claimed ahead and not due yet
        await asyncio.wait_for(runner, 30)

    asyncio.run(main())
    with engine.connect() as conn:
        rows = conn.execute(
            select(JobLog.id, JobLog.scheduled_at, JobLog.created_at, JobLog.due_at)
            .where(JobLog.task_id == task)
            .order_by(JobLog.scheduled_at)
        ).all()
    # Never sent before its slot; each slot once, none skipped; a clean stop sent every
    # row it had claimed, the held ones included.
    assert all(at >= job.scheduled_at for job, at in handed)
    slots = [r.scheduled_at for r in rows]
    assert len(set(slots)) == len(slots) >= 3
    assert {b - a for a, b in zip(slots, slots[1:], strict=False)} == {timedelta(seconds=1)}
    assert sorted(job.job_log_id for job, _ in handed) == sorted(r.id for r in rows)
    # Claimed ahead: committed before the slot, the row due at it (a restart or a peer's
    # adoption sends it then, not at once).
    ahead = [r for r in rows if r.created_at < r.scheduled_at]
    assert ahead, "no slot was claimed ahead of its time"
    assert all(r.due_at == r.scheduled_at for r in ahead)


def test_timers_are_counted_per_second_and_a_crowded_second_is_named() -> None:
    timers = TimerList(crowd=3)
    schedule = parse_schedule("* * * * * *")
    slot = datetime(2026, 1, 1, 0, 0, 10)
    for task_id in (1, 2, 3):
        timers.put(Timer(task_id, 1, schedule, "UTC", "skip", slot))
    timers.put(Timer(4, 1, schedule, "UTC", "skip", slot + timedelta(microseconds=500)))
    assert timers.count_at(slot) == 4 and timers.crowded == {slot}
    # Replaced (moved to another second), removed, fired: each leaves the count.
    timers.put(Timer(4, 2, schedule, "UTC", "skip", slot + timedelta(seconds=1)))
    assert timers.count_at(slot) == 3 and timers.count_at(slot + timedelta(seconds=1)) == 1
    timers.remove(3)
    assert timers.count_at(slot) == 2 and timers.crowded == set()
    assert [t.task_id for t in timers.pop_due(slot)] in ([1, 2], [2, 1])
    assert timers.count_at(slot) == 0 and len(timers) == 1


def test_a_crowded_second_is_claimed_earlier_than_claim_ahead_and_sent_at_its_slot(
    engine: Engine,
) -> None:
    """30 slots in one second, planned at 5 claims a second: the second needs 6 s, so it
    starts BURST_AHEAD (5 s) before its slot instead of claim_ahead's 1 s."""
    slot = (utcnow() + timedelta(seconds=12)).replace(microsecond=0)
    tasks = [add_task(engine, f"crowd{i}", f"{slot.second} * * * * *") for i in range(30)]
    handed: list[tuple[JobDispatch, datetime]] = []

    async def on_claimed(jobs: list[JobDispatch]) -> None:
        now = utcnow()
        handed.extend((job, now) for job in jobs)

    async def main() -> None:
        scheduler = Scheduler(
            engine, MANAGER, on_claimed, reconcile_interval=60, claim_ahead=1, claim_rate=5
        )
        runner = asyncio.create_task(scheduler.run())
        await asyncio.wait_for(scheduler.ready.wait(), 30)
        assert utcnow() < slot - timedelta(seconds=6), "the machine is too slow for this test"
        deadline = slot + timedelta(seconds=60)
        while len(handed) < len(tasks) and utcnow() < deadline:
            await asyncio.sleep(0.05)
        scheduler.stop()
        await asyncio.wait_for(runner, 30)

    asyncio.run(main())
    with engine.connect() as conn:
        rows = conn.execute(
            select(JobLog.task_id, JobLog.created_at, JobLog.due_at).where(
                JobLog.scheduled_at == slot
            )
        ).all()
    assert sorted(r.task_id for r in rows) == tasks  # each slot claimed once
    # Claimed well before claim_ahead's 1 s, held, and sent at the slot, each once.
    assert all(r.created_at <= slot - timedelta(seconds=2) for r in rows), rows
    assert all(r.due_at == slot for r in rows)
    assert sorted(job.task_id for job, _ in handed if job.scheduled_at == slot) == tasks
    assert all(at >= job.scheduled_at for job, at in handed)


def test_a_run_claimed_ahead_is_not_sent_when_its_task_is_disabled_before_the_slot(
    engine: Engine,
) -> None:
    # The slot: a second at least 7 s ahead; claimed 5 s before it, then the task is
    # disabled behind this scheduler's back (another manager's API), its timer still here.
    slot = (utcnow() + timedelta(seconds=8)).replace(microsecond=0)
    task = add_task(engine, "disabled-ahead", f"{slot.second} * * * * *")
    kept = add_task(engine, "kept-ahead", f"{slot.second} * * * * *")
    handed: list[JobDispatch] = []

    async def on_claimed(jobs: list[JobDispatch]) -> None:
        handed.extend(jobs)

    def claimed() -> int:
        with engine.connect() as conn:
            return conn.execute(
                select(func.count()).select_from(JobLog).where(JobLog.scheduled_at == slot)
            ).scalar_one()

    async def main() -> None:
        scheduler = Scheduler(engine, MANAGER, on_claimed, reconcile_interval=60, claim_ahead=5)
        runner = asyncio.create_task(scheduler.run())
        deadline = utcnow() + timedelta(seconds=60)
        while await asyncio.to_thread(claimed) < 2 and utcnow() < deadline:
            await asyncio.sleep(0.05)
        assert utcnow() < slot - timedelta(seconds=1), "the machine is too slow for this test"
        assert not handed  # held until the slot
        await asyncio.to_thread(change_task, engine, task, enabled=False)
        while not handed and utcnow() < deadline:
            await asyncio.sleep(0.05)
        scheduler.stop()
        await asyncio.wait_for(runner, 30)

    asyncio.run(main())
    assert [(job.task_id, job.scheduled_at) for job in handed] == [(kept, slot)]
    with engine.connect() as conn:
        rows = (
            conn.execute(select(JobLog.task_id).where(JobLog.scheduled_at == slot)).scalars().all()
        )
    assert rows == [kept]  # the disabled task's row is gone, as if never claimed
