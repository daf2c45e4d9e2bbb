"""The fire forecast (manager/forecast.py), on SQLite and MariaDB."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from croniter import croniter
from sqlalchemy import Engine, insert
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.exceptions import ScheduleError, ValidationError
from ays_runtime.manager import forecast as forecast_module
from ays_runtime.manager import tasks
from ays_runtime.manager.forecast import forecast, keep_warm, tasks_at
from ays_runtime.scheduler import schedule as schedule_module
from ays_runtime.scheduler.schedule import cron_minutes, cron_minutes_walked, parse_schedule
from ays_runtime.storage.models import NodeGroup, Task

START = datetime(2026, 12, 4, 12, 0, 30)  # the window starts at 12:00:00
MINUTE = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def add_tasks(sessions: sessionmaker[Session], specs: list[tuple[str, str, bool]]) -> None:
    """(schedule, timezone, enabled) per task, named t0, t1, ..."""
    with sessions() as session:
        session.add(NodeGroup(name="g", created_at=START, updated_at=START))
        session.flush()
        session.execute(
            insert(Task),
            [
                {
                    "name": f"t{i}",
                    "node_group": "g",
                    "schedule": schedule,
                    "timezone": tz,
                    "enabled": enabled,
                    "payload": {"command": "true"},
                    "created_at": START,
                    "updated_at": START,
                }
                for i, (schedule, tz, enabled) in enumerate(specs)
            ],
        )
        session.commit()


def test_the_forecast_counts_fires_per_minute_and_finds_the_pile_up_behind_each_cell(
    sessions: sessionmaker[Session],
) -> None:
    add_tasks(
        sessions,
        [("0 * * * * *", "UTC", True)] * 120  # t0-t119: at :00 of every minute
        + [("* * * * *", "Asia/Riyadh", True)] * 30  # t120-t149: the same, 5-field, another zone
        + [("0 30 2 * * *", "Asia/Riyadh", True)]  # t150: 02:30 in Riyadh is 23:30 UTC
        + [("@every 500ms", "UTC", True)]  # t151: 120 fires a minute
        + [("*/10 * * * * *", "UTC", False)] * 5  # disabled: never counted
        + [("0 0 25 * * *", "UTC", True)],  # t157: edited behind the API's back, invalid
    )
    with sessions() as session:
        plan = forecast(session, start=START, hours=24, threshold=100, tasks_per_pileup=5)

    assert plan.start == MINUTE and plan.end == MINUTE + timedelta(hours=24)
    assert len(plan.fires) == len(plan.peak_second) == 1440
    assert plan.tasks == 152 and plan.expressions == 4
    assert [t.name for t in plan.invalid] == ["t157"]
    assert plan.fires[0] == 150 + 120
    assert plan.peak_second[0] == 150 + 2
    assert plan.fires[11 * 60 + 30] == 150 + 1 + 120  # 23:30 UTC
    assert plan.total_fires == 1440 * 270 + 1

    top = plan.pileups[0]
    assert top.second == 0 and top.minutes == 1439 and not top.every_minute
    assert top.fires == 152  # 150 tasks and the @every 500ms rate's two slots of that second
    assert top.summary.startswith("152 fires at :00 of 1439 minutes")
    assert [(e.schedule, e.timezone, e.tasks) for e in top.expressions] == [
        ("0 * * * * *", "UTC", 120),
        ("* * * * *", "Asia/Riyadh", 30),
        ("@every 500ms", "UTC", 1),
    ]
    assert [t.name for t in top.tasks] == ["t0", "t1", "t2", "t3", "t4"]
    assert top.tasks_total == 151
    once = plan.pileups[1]
    assert once.minutes == 1 and once.fires == 153 and once.tasks_total == 152
    assert once.first_at == MINUTE + timedelta(hours=11, minutes=30)
    assert once.summary.startswith("153 fires at 2026-12-04 23:30:00 UTC")
    assert not plan.pileups_truncated


def test_a_pile_up_in_every_minute_of_the_window_says_so(sessions: sessionmaker[Session]) -> None:
    add_tasks(sessions, [("0 * * * * *", "UTC", True)] * 3)
    with sessions() as session:
        plan = forecast(session, start=START, hours=1, threshold=3)
    assert len(plan.pileups) == 1
    assert (
        plan.pileups[0].summary == "3 fires at :00 of every minute, from 3 task(s) on 1 schedule(s)"
    )


def test_the_tasks_due_in_one_second_are_paged(sessions: sessionmaker[Session]) -> None:
    add_tasks(
        sessions,
        [("0 * * * * *", "UTC", True)] * 7 + [("30 * * * * *", "UTC", True)] * 2,
    )
    with sessions() as session:
        page = tasks_at(session, START.replace(second=0), limit=3, offset=3)
        half = tasks_at(session, START.replace(second=30, microsecond=400_000))
    assert page.total == 7 and [t.name for t in page.items] == ["t3", "t4", "t5"]
    assert half.at == MINUTE + timedelta(seconds=30)
    assert [t.name for t in half.items] == ["t7", "t8"]


def test_a_task_changed_shows_in_the_next_forecast_at_once(
    sessions: sessionmaker[Session],
) -> None:
    add_tasks(sessions, [("0 * * * * *", "UTC", True)] * 3)
    with sessions() as session:
        before = forecast(session, start=START, hours=1, threshold=1)
        again = forecast(session, start=START, hours=1, threshold=1)
    assert again is before  # a reload in the same minute is answered from the cache
    assert before.fires[0] == 3 and before.pileups[0].tasks_total == 3

    with sessions() as session:
        tasks.update_task(session, 1, {"schedule": "30 * * * * *"})  # t0 moves to :30
        tasks.disable_task(session, 2)  # t1 no longer fires
        moved = forecast(session, start=START, hours=1, threshold=1)
        due = tasks_at(session, START.replace(second=30))
    assert moved.fires[0] == 2 and moved.peak_second[0] == 1 and moved.tasks == 2
    assert [(p.second, [t.name for t in p.tasks]) for p in moved.pileups] == [
        (0, ["t2"]),
        (30, ["t0"]),
    ]
    assert [t.name for t in due.items] == ["t0"]

    with sessions() as session:
        tasks.delete_task(session, 3)
        tasks.enable_task(session, 2)
        back = forecast(session, start=START, hours=1, threshold=1)
    assert back.fires[0] == 2 and [t.name for t in back.pileups[0].tasks] == ["t1"]


@pytest.mark.parametrize(
    "first",
    [START, datetime(2026, 3, 29, 0, 0), datetime(2026, 10, 25, 0, 30)],  # Europe's DST changes
)
def test_a_window_shifted_from_a_cached_one_is_the_window_computed_afresh(
    sessions: sessionmaker[Session], first: datetime
) -> None:
    add_tasks(
        sessions,
        [
            ("0 */7 * * * *", "UTC", True),
            ("15 5,50 3 * * *", "Asia/Kolkata", True),
            ("0 0 9 * * 1-5", "America/New_York", True),
            ("*/20 * * * * *", "Europe/Berlin", True),
            ("0 */5 * * * *", "Europe/Berlin", True),
            ("0 15 */2 * * 0", "Europe/Berlin", True),
            ("@every 7s", "UTC", True),
        ],
    )
    later = first + timedelta(minutes=37)  # the same hour: a slice of the cached window
    with sessions() as session:
        forecast(session, start=first, hours=24, threshold=1)
        shifted = forecast(session, start=later, hours=24, threshold=1)
    forecast_module._cron_window.cache_clear()
    forecast_module._snapshots.clear()
    with sessions() as session:
        fresh = forecast(session, start=later, hours=24, threshold=1)
    assert shifted is not fresh and shifted == fresh


def test_a_window_longer_than_a_week_is_refused(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, pytest.raises(ValidationError, match="hours: 169"):
        forecast(session, hours=169)


def test_no_minute_before_the_window_is_walked_to_in_a_repeated_hour() -> None:
    # 01:00 UTC on 2026-10-25 is 03:00 CEST, which becomes 02:00 CET: croniter's next
    # 02:15 is in the hour before.
    found = cron_minutes_walked("15 */2 * * 0", "Europe/Berlin", datetime(2026, 10, 25, 1), 600)
    assert found and min(found) >= 0


@pytest.mark.parametrize(
    "fields",
    [
        "0 9 * * 1-5",
        "*/7 1-3 1,15 * *",
        "15 */2 * * 0",
        "0 0 1 * 5",  # both day fields: either matches
        "30 2 * * *",
        "0 0 29 2 *",
        "0 12 L * *",  # walked by croniter
        "0 8 * * 1#1",  # walked by croniter
    ],
)
@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata", "Europe/Berlin", "America/New_York"])
@pytest.mark.parametrize("begin", [datetime(2026, 12, 4, 12, 0), datetime(2026, 3, 27, 0, 0)])
def test_the_minutes_matched_from_the_expanded_fields_are_those_croniter_walks_to(
    fields: str, zone: str, begin: datetime
) -> None:
    minutes = 7 * 24 * 60  # the week around Europe's change to summer time included
    assert cron_minutes(fields, zone, begin, minutes) == cron_minutes_walked(
        fields, zone, begin, minutes
    )


def test_a_manager_computes_the_consoles_forecast_before_anyone_asks_and_stops_when_told(
    sessions: sessionmaker[Session], engine: Engine
) -> None:
    add_tasks(sessions, [("0 * * * * *", "UTC", True)] * 3 + [("@every 10s", "UTC", True)])
    forecast_module._snapshots.clear()

    def warmed() -> tuple[tuple[Any, ...], forecast_module.Forecast] | None:
        kept = forecast_module._snapshots.get(engine)
        for key, answer in list(kept.forecasts.items()) if kept else []:
            if key[1:] == forecast_module.WARM_AT_START:
                return key, answer
        return None

    async def run() -> tuple[tuple[Any, ...], forecast_module.Forecast]:
        stop = asyncio.Event()
        warming = asyncio.create_task(keep_warm(sessions, stop))
        for _ in range(600):  # 30 s at most
            found = warmed()
            if found:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(warming, 30)  # ends when told, between two minutes
        assert found, "keep_warm computed no forecast in 30 s"
        return found

    key, answer = asyncio.run(run())
    assert (answer.tasks, answer.expressions) == (4, 2)
    with sessions() as session:  # the same window and parameters as the console's: kept
        assert forecast(session, start=key[0]) is answer


@pytest.mark.parametrize(
    "expression",
    [
        "0 */7 * * * *",
        "15 5,50 3 * * *",
        "0 0 9 * * 1-5",
        "0 0 0 L * *",
        "0 0 0 * * 5#2",
        "0 0 12 1,15 JAN-JUN/2 MON",
        "*/20 * * * * *",
        "0 0 0 31 2,4 *",
    ],
)
def test_a_parsed_schedule_leaves_the_expansion_croniter_gives_for_its_five_fields(
    expression: str,
) -> None:
    five = expression.split(" ", 1)[1]
    schedule_module._expansions.pop(five, None)
    try:
        parse_schedule(expression, "Europe/Berlin")
    except ScheduleError:
        pass  # 31 February never comes: refused, what it left must still be croniter's
    left = schedule_module._expansions.pop(five, "none left")
    expanded, nth = croniter.expand(five)
    assert left in ("none left", schedule_module._plain(expanded, nth))
    assert schedule_module._expanded(five) == schedule_module._plain(expanded, nth)
