"""The slot ledger (manager/slots.py), on SQLite and MariaDB: every slot of a task's
schedule in a range and what the job log says became of it."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.exceptions import NotFoundError, ValidationError
from ays_runtime.manager.slots import slot_ledger
from ays_runtime.scheduler.ledger import OwedRange, record_owed
from ays_runtime.scheduler.schedule import Schedule, parse_schedule
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import JobLog, NodeGroup, SlotMiss, Task
from ays_runtime.vocabulary import SlotMissReason
from tests.daemons import (
    Cluster,
    Daemon,
    client,
    cluster,
    free_port,
    manager,
    wait_for,
    write_config,
)
from tests.test_end_to_end import add_task as add_task_by_api
from tests.test_metrics import scrape, value

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


def miss(task_id: int, first: int, end: int, reason: str, count: int) -> dict[str, Any]:
    """A ledger range of minutes [first, end) after T0."""
    return {
        "task_id": task_id,
        "first_at": T0 + timedelta(minutes=first),
        "end_at": T0 + timedelta(minutes=end),
        "slot_count": count,
        "reason": reason,
        "manager_id": "10.0.0.1:18080",
        "recorded_at": T0 + timedelta(minutes=end),
    }


def test_slots_in_a_ledger_range_are_skipped_or_missed_and_folded_when_fired_once(
    sessions: sessionmaker[Session],
) -> None:
    task_id = add_task(sessions)
    with sessions() as session:
        session.execute(
            insert(JobLog),
            [row(task_id, 1), row(task_id, 4, late_s=30, trigger="misfire"), row(task_id, 8)],
        )
        session.execute(
            insert(SlotMiss),
            [
                miss(task_id, 2, 4, "missed", 2),  # 12:02, 12:03: folded into 12:04's fire
                miss(task_id, 5, 7, "skipped", 2),  # 12:05, 12:06: misfire policy skip
                miss(task_id, 9, 11, "missed", 2),  # 12:09 (and 12:10, after the range)
            ],
        )
        session.commit()
        ledger = slot_ledger(
            session, task_id, T0, T0 + timedelta(minutes=10), now=T0 + timedelta(hours=1)
        )
    outcomes = [(s.scheduled_at.strftime("%H:%M"), s.outcome.value) for s in ledger.slots]
    assert outcomes == [
        ("12:00", "before_task"),
        ("12:01", "fired"),
        ("12:02", "folded"),
        ("12:03", "folded"),
        ("12:04", "fired_once"),
        ("12:05", "skipped"),
        ("12:06", "skipped"),
        ("12:07", "not_fired"),  # in no range: nobody saw why
        ("12:08", "fired"),
        ("12:09", "missed"),
    ]
    by_minute = {s.scheduled_at.minute: s for s in ledger.slots}
    assert by_minute[5].run is None and by_minute[9].run is None
    assert ledger.counts["missed"] == 1 and ledger.counts["skipped"] == 2
    assert [(m.first_at.minute, m.reason.value, m.slot_count) for m in ledger.misses] == [
        (2, "missed", 2),
        (5, "skipped", 2),
        (9, "missed", 2),
    ]
    assert ledger.model_dump(mode="json")["misses"][2]["end_at"] == "2026-12-04T12:11:00Z"


@pytest.mark.parametrize("expression", ["*/5 * * * * *", "0 */7 * * * *", "@every 1500ms"])
def test_a_schedule_counts_the_slots_of_a_range_as_it_lists_them(expression: str) -> None:
    schedule = parse_schedule(expression, "Europe/Berlin")
    start = datetime(2026, 3, 28, 23, 59, 58, 500)  # the night the clocks go forward
    for span in (timedelta(seconds=37), timedelta(hours=5), timedelta(days=9)):
        end = start + span
        assert schedule.count_between(start, end) == len(schedule.slots_between(start, end, 10**7))


@pytest.mark.slow
def test_a_manager_stopped_for_a_while_records_the_slots_it_missed_and_the_api_answers_missed(
    tmp_path: Path,
) -> None:
    with cluster(tmp_path, Cluster, manager={"misfire_grace": 1}) as ays:
        task = add_task_by_api(ays, "true", schedule="* * * * * *", name="every-second")

        def fired() -> bool:
            with ays.api() as api:
                return api.get("/job-logs", params={"task_id": task}).json()["total"] >= 2

        wait_for(fired, 60, "the task's first fires")
        ays.manager.stop()
        stopped = utcnow()
        time.sleep(6)  # down for a while: the slots of these seconds are owed
        ays.manager = manager(ays.config, tmp_path / "m2.log", ays.manager_port).start()

        def ledger() -> dict[str, Any] | None:
            since = (stopped - timedelta(seconds=30)).isoformat()
            with ays.api() as api:
                body = api.get(f"/tasks/{task}/slots", params={"from": since}).json()
            return body if body["misses"] else None

        body = wait_for(ledger, 60, "the missed range in the ledger")
        [missed] = body["misses"]
        assert missed["reason"] == "missed" and missed["slot_count"] >= 4
        first = datetime.fromisoformat(missed["first_at"]).replace(tzinfo=None)
        end = datetime.fromisoformat(missed["end_at"]).replace(tzinfo=None)
        assert first <= stopped + timedelta(seconds=2) and end >= stopped + timedelta(seconds=6)
        assert missed["slot_count"] == (end - first).seconds
        outcome = {s["scheduled_at"]: s["outcome"] for s in body["slots"]}
        in_it = (stopped + timedelta(seconds=4)).replace(microsecond=0).isoformat() + "Z"
        assert outcome[in_it] == "missed"
        assert body["counts"]["missed"] >= 4
        samples = scrape(ays.manager_port)
        assert value(samples, "ays_slots_missed_total", reason="missed") == missed["slot_count"]
        assert value(samples, "ays_slots_missed_total", reason="skipped") == 0


@pytest.mark.slow
@pytest.mark.mysql
def test_two_managers_starting_together_on_mariadb_record_the_missed_range_once(
    tmp_path: Path, mysql_url: str
) -> None:
    ports = [free_port(), free_port()]
    daemons = []
    for i, port in enumerate(ports):
        config = write_config(
            tmp_path / f"ays{i}.yaml",
            mysql_url,
            port,
            tmp_path / f"m{i}",
            manager={"misfire_grace": 1},
        )
        daemons.append((config, port))

    def start_all(round_: int) -> list[Daemon]:
        started = [manager(c, tmp_path / f"m{p}-{round_}.log", p) for c, p in daemons]
        threads = [threading.Thread(target=d.start) for d in started]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        return started

    running = start_all(1)
    try:
        with client(ports[0]) as api:
            assert api.post("/node-groups", json={"name": "g1"}).status_code == 201
            body = {"name": "every-second", "node_group": "g1", "schedule": "* * * * * *"}
            body |= {"task_type": "shell", "payload": {"command": "true"}}
            task = api.post("/tasks", json=body).json()["id"]

            def fired() -> bool:
                return api.get("/job-logs", params={"task_id": task}).json()["total"] >= 3

            wait_for(fired, 60, "the task's first fires")
        for daemon in running:
            daemon.stop()
        time.sleep(5)  # no manager: the slots of these seconds are owed
        running = start_all(2)

        def ranges() -> list[dict[str, Any]]:
            with client(ports[1]) as api:
                answer = api.get(f"/tasks/{task}/slots").json()
            return list(answer["misses"])

        found = wait_for(ranges, 60, "the missed range")
        time.sleep(2)  # both managers have reconciled since
        found = ranges()
        assert len(found) == 1 and found[0]["reason"] == "missed", found
        assert found[0]["slot_count"] >= 4
    finally:
        for daemon in running:
            daemon.kill()


def test_a_range_recorded_twice_even_by_two_managers_at_once_is_counted_once(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    task = add_task(sessions)
    schedule = parse_schedule("0 * * * * *", "UTC")
    first, end = T0 + timedelta(minutes=1), T0 + timedelta(minutes=11)
    owed = OwedRange(task, first, end, SlotMissReason.MISSED, schedule)
    holding, counts = threading.Event(), {}

    def record(name: str, ranges: list[OwedRange], hold: bool) -> None:
        with engine.begin() as conn:
            counts[name] = record_owed(conn, name, ranges, utcnow())
            if hold:  # the other manager writes while this transaction is open
                holding.set()
                time.sleep(1.0)

    first_manager = threading.Thread(target=record, args=("m1", [owed], True))
    first_manager.start()
    assert holding.wait(30)
    second_manager = threading.Thread(target=record, args=("m2", [owed], False))
    second_manager.start()
    first_manager.join(60)
    second_manager.join(60)
    assert counts["m1"]["missed"] + counts["m2"]["missed"] == 10, counts
    record("m1", [owed], False)  # the same range once more: nothing new
    assert sum(counts["m1"].values()) == 0
    wider = OwedRange(task, first, end + timedelta(minutes=5), SlotMissReason.MISSED, schedule)
    record("m2", [wider, owed], False)  # widened by 5 slots: those 5 count
    assert counts["m2"]["missed"] == 5
    with sessions() as session:
        (stored,) = session.scalars(select(SlotMiss)).all()
        assert stored.slot_count == 15 and stored.end_at == end + timedelta(minutes=5)
