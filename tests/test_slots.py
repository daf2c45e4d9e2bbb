"""The slot ledger (manager/slots.py), on SQLite and MariaDB: every slot of a task's
schedule in a range and what the job log says became of it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.exceptions import NotFoundError, ValidationError
from ays_runtime.manager.slots import slot_ledger
from ays_runtime.scheduler.schedule import Schedule, parse_schedule
from ays_runtime.storage.models import JobLog, NodeGroup, Task

T0 = datetime(2026, 12, 4, 12, 0)  # the task fires at :00 of every minute


def add_task(sessions: sessionmaker[Session], schedule: str = "0 * * * * *") -> int:
    with sessions() as session:
        session.add(NodeGroup(name="g", created_at=T0, updated_at=T0))
        session.flush()
        task = Task(
            name="every-minute",
            node_group="g",
            schedule=schedule,
            misfire_policy="fire_once_now",
            payload={"command": "true"},
            created_at=T0 + timedelta(minutes=1),
            updated_at=T0,
        )
        session.add(task)
        session.commit()
        return task.id


def row(task_id: int, minute: int, late_s: float = 0.02, **values: Any) -> dict[str, Any]:
    at = T0 + timedelta(minutes=minute)
    data = {
        "task_id": task_id,
        "scheduled_at": at,
        "created_at": at + timedelta(seconds=late_s),
        "status": "succeeded",
        "node": "10.0.0.1:18181",
        "output": "",
        "message": "",
    }
    data.update(values)
    return data


def test_every_slot_is_shown_fired_late_folded_skipped_or_not_fired(
    sessions: sessionmaker[Session],
) -> None:
    task_id = add_task(sessions)
    rows = [
        row(task_id, 1),  # 12:01 fired on time
        row(task_id, 2, late_s=3.5),  # 12:02 fired 3.5 s late
        row(task_id, 3, status="failed", message="exit 1"),  # 12:03 fired, then retried:
        row(task_id, 3, late_s=10, attempt=1, trigger="retry", status="succeeded"),
        # 12:04 and 12:05 missed (no manager up), 12:06 fired once by the misfire policy
        row(task_id, 6, late_s=42, trigger="misfire"),
        row(task_id, 7, status="skipped", message="serial: still running"),  # 12:07
        # 12:08 no row at all; 12:09 is `now`: upcoming
        row(task_id, 0, late_s=0.5, trigger="manual"),  # a manual run is no slot
        # 12:00:30 fired under an earlier schedule of the task
        row(task_id, 0, late_s=0.1) | {"scheduled_at": T0 + timedelta(seconds=30)},
    ]
    with sessions() as session:
        session.execute(insert(JobLog), rows)
        session.commit()
        ledger = slot_ledger(
            session,
            task_id,
            T0,
            T0 + timedelta(minutes=10),
            late_after=timedelta(seconds=1),
            now=T0 + timedelta(minutes=9, seconds=2),
        )

    outcomes = [(s.scheduled_at.strftime("%H:%M"), s.outcome.value) for s in ledger.slots]
    assert outcomes == [
        ("12:00", "before_task"),
        ("12:01", "fired"),
        ("12:02", "late"),
        ("12:03", "fired"),
        ("12:04", "folded"),
        ("12:05", "folded"),
        ("12:06", "fired_once"),
        ("12:07", "skipped"),
        ("12:08", "not_fired"),
        ("12:09", "upcoming"),
    ]
    by_minute = {s.scheduled_at.minute: s for s in ledger.slots}
    assert by_minute[2].lateness_s == 3.5
    retried = by_minute[3].run
    assert retried is not None
    assert (retried.status, retried.attempts, retried.final_status) == ("failed", 2, "succeeded")
    assert by_minute[4].folded_into == T0.replace(minute=6, tzinfo=UTC)
    assert by_minute[6].lateness_s == 42 and by_minute[6].run is not None
    assert by_minute[6].run.trigger == "misfire"
    assert by_minute[7].run is not None and by_minute[7].run.message == "serial: still running"
    assert by_minute[8].run is None and by_minute[8].lateness_s is None
    assert [s.scheduled_at.second for s in ledger.off_schedule] == [30]
    assert ledger.counts["folded"] == 2 and ledger.counts["fired"] == 2
    assert sum(ledger.counts.values()) == 10
    assert ledger.model_dump(mode="json")["start"] == "2026-12-04T12:00:00Z"


def test_a_range_of_more_slots_than_the_bound_is_refused_naming_the_last_allowed_slot(
    sessions: sessionmaker[Session],
) -> None:
    task_id = add_task(sessions, schedule="@every 1s")
    with sessions() as session:
        ledger = slot_ledger(session, task_id, T0, T0 + timedelta(seconds=100), max_slots=100)
        assert len(ledger.slots) == 100
        with pytest.raises(ValidationError, match=r"to: .*at most 100 slots.*12:01:39Z"):
            slot_ledger(session, task_id, T0, T0 + timedelta(seconds=101), max_slots=100)
        with pytest.raises(ValidationError, match="to: .* a time after from"):
            slot_ledger(session, task_id, T0, T0)
        with pytest.raises(NotFoundError, match="task 999"):
            slot_ledger(session, 999, T0, T0 + timedelta(minutes=1))


@pytest.mark.parametrize(
    ("expression", "zone"),
    [
        ("*/20 * * * * *", "UTC"),
        ("0 9 * * 1-5", "Europe/Berlin"),
        ("30 */7 1-3 * * *", "Asia/Kolkata"),
        ("0 30 2 * * *", "Europe/Berlin"),  # 2026-03-29 02:30 does not exist there
        ("0 0 12 L * *", "America/New_York"),
        ("@every 90s", "UTC"),
    ],
)
def test_the_slots_of_a_range_are_those_the_scheduler_walks_to(expression: str, zone: str) -> None:
    schedule = parse_schedule(expression, zone)
    start = datetime(2026, 3, 26, 23, 59, 50)
    for end in (start + timedelta(hours=5), start + timedelta(days=6)):
        walked = Schedule.slots_between(schedule, start, end, 100_000)
        assert schedule.slots_between(start, end, 100_000) == walked
        assert schedule.slots_between(start, end, 3) == walked[:4]
