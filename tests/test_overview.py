"""The dashboard's figures (manager/overview.py), on SQLite and MariaDB."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.manager import overview as overview_module
from ays_runtime.manager.overview import TIMELINE_MINUTES, keep_warm, overview, warm
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import JobLog, Manager, Node, NodeGroup, Task

NOW = datetime(2026, 12, 4, 12, 30, 15)


def add_task(session: Session, name: str, group: str = "g1") -> int:
    task = Task(
        name=name,
        node_group=group,
        schedule="0 * * * * *",
        payload={"command": "true"},
        created_at=NOW - timedelta(days=2),
        updated_at=NOW - timedelta(days=2),
    )
    session.add(task)
    session.flush()
    return task.id


def run(task_id: int, scheduled_at: datetime, **values: Any) -> dict[str, Any]:
    row = {
        "task_id": task_id,
        "scheduled_at": scheduled_at,
        "created_at": scheduled_at,
        "status": "succeeded",
        "output": "",
        "message": "",
    }
    row.update(values)
    return row


def seed(sessions: sessionmaker[Session]) -> tuple[int, int]:
    with sessions() as session:
        for name in ("g1", "g2", "empty"):
            session.add(NodeGroup(name=name, created_at=NOW, updated_at=NOW))
        session.flush()
        for port, group, status in [
            (1, "g1", "online"),
            (2, "g1", "online"),
            (3, "g1", "offline"),
            (4, "g2", "unknown"),
        ]:
            session.add(
                Node(
                    ip="10.0.0.1",
                    port=port,
                    node_group=group,
                    status=status,
                    created_at=NOW,
                    updated_at=NOW,
                )
            )
        session.add(
            Manager(manager_id="10.0.0.9:18080", version="1", started_at=NOW, last_seen=NOW)
        )
        session.add(
            Manager(
                manager_id="10.0.0.8:18080",
                version="1",
                started_at=NOW - timedelta(hours=3),
                last_seen=NOW - timedelta(minutes=10),
            )
        )
        a, b = add_task(session, "alpha"), add_task(session, "beta")
        session.commit()
    minute = NOW.replace(second=0) - timedelta(minutes=5)  # 12:25:00
    rows = [
        # 12:25: 100 fires, 98 on time (10 ms late), one 0.3 s late, one 7 s late.
        *[
            run(
                a,
                minute + timedelta(microseconds=i),
                created_at=minute + timedelta(microseconds=i + 10_000),
            )
            for i in range(98)
        ],
        run(b, minute, created_at=minute + timedelta(milliseconds=300)),
        run(b, minute + timedelta(seconds=1), created_at=minute + timedelta(seconds=8)),
        # Not fires: a retry, a manual run.
        run(a, minute, attempt=1, status="failed", message="exit 1 again"),
        run(a, minute + timedelta(seconds=2), trigger="manual"),
        # Within the hour: two failures and going runs.
        run(b, NOW - timedelta(minutes=20), status="failed", message="exit 1"),
        run(b, NOW - timedelta(minutes=10), status="timed_out", message="timeout 5s"),
        run(
            a,
            NOW - timedelta(minutes=1),
            status="running",
            node="10.0.0.1:1",
            started_at=NOW - timedelta(seconds=50),
        ),
        run(a, NOW - timedelta(seconds=30), status="pending"),
        run(a, NOW - timedelta(minutes=3), status="skipped"),
        # Earlier in the day, and before it (counted in neither window).
        run(a, NOW - timedelta(hours=5), status="node_lost", message="node gone"),
        run(a, NOW - timedelta(hours=30), status="failed", message="old"),
    ]
    with sessions() as session:
        session.execute(insert(JobLog), rows)
        session.commit()
    return a, b


def test_the_overview_counts_nodes_runs_fires_lateness_failures_and_managers(
    sessions: sessionmaker[Session],
) -> None:
    alpha, beta = seed(sessions)
    with sessions() as session:
        view = overview(session, now=NOW, manager_silent_after=timedelta(seconds=60), failures=3)

    assert [(g.node_group, g.online, g.offline, g.unknown) for g in view.nodes] == [
        ("empty", 0, 0, 0),
        ("g1", 2, 1, 0),
        ("g2", 0, 0, 1),
    ]
    hour = view.last_hour
    assert hour.by_status["failed"] == 2 and hour.by_status["succeeded"] == 101
    assert hour.by_status["timed_out"] == 1 and hour.by_status["skipped"] == 1
    assert hour.total == 107
    assert hour.finished == 104  # running, pending and skipped left out
    assert hour.success_rate == 101 / 104
    assert view.last_day.total == 108 and view.last_day.by_status["node_lost"] == 1

    timeline = view.timeline
    assert len(timeline.fires) == len(timeline.p99_lateness_s) == TIMELINE_MINUTES
    assert timeline.start == datetime(2026, 12, 3, 12, 31, tzinfo=UTC)
    index = TIMELINE_MINUTES - 6  # 12:25
    # 100 fires (the claim rows of cron slots); the retry and the manual run are not fires.
    assert timeline.fires[index] == 100
    p99 = timeline.p99_lateness_s[index]
    assert p99 is not None and 0.25 <= p99 <= 0.3  # the 99th of 100 is the 0.3 s one
    # The running and the pending one (12:29:15, 12:29:45), the skipped one (12:27).
    assert timeline.fires[TIMELINE_MINUTES - 2] == 2
    assert timeline.fires[TIMELINE_MINUTES - 4] == 1
    assert timeline.p99_lateness_s[TIMELINE_MINUTES - 4] == 0.0
    assert sum(timeline.fires) == 100 + 6
    assert timeline.p99_lateness_s[0] is None

    assert (view.going.pending, view.going.dispatched, view.going.running) == (1, 0, 1)
    assert [(r.task_name, r.node) for r in view.going.runs] == [("alpha", "10.0.0.1:1")]

    failures = view.recent_failures
    assert [(f.task_name, f.status, f.message) for f in failures] == [
        ("alpha", "failed", "exit 1 again"),  # a failed retry is a failure too
        ("beta", "timed_out", "timeout 5s"),
        ("beta", "failed", "exit 1"),
    ]
    assert failures[0].task_id == alpha and failures[1].task_id == beta

    assert [(m.manager_id, m.alive) for m in view.managers] == [
        ("10.0.0.8:18080", False),
        ("10.0.0.9:18080", True),
    ]


def test_an_empty_database_has_an_overview_of_zeros(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        view = overview(session, now=NOW)
    assert view.nodes == [] and view.managers == [] and view.recent_failures == []
    assert view.last_day.total == 0 and view.last_day.success_rate is None
    assert sum(view.timeline.fires) == 0
    assert view.model_dump(mode="json")["generated_at"].endswith("Z")


def test_settled_minutes_are_kept_and_minutes_with_unfinished_runs_read_again(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as session:
        session.add(NodeGroup(name="g1", created_at=NOW, updated_at=NOW))
        session.flush()
        task = add_task(session, "alpha")
        session.commit()
        session.execute(
            insert(JobLog),
            [
                run(task, NOW - timedelta(minutes=40), status="running"),
                run(task, NOW - timedelta(minutes=30)),
            ],
        )
        session.commit()
        first = overview(session, now=NOW)
        assert first.last_hour.by_status["running"] == 1
        # The long run ends; a new run is claimed now; and a row appears in a settled minute,
        # which no manager writes (created_at is the claiming manager's clock).
        session.execute(update(JobLog).where(JobLog.status == "running").values(status="failed"))
        session.execute(
            insert(JobLog),
            [
                run(task, NOW - timedelta(seconds=5), status="pending"),
                run(task, NOW - timedelta(minutes=20)),
            ],
        )
        session.commit()
        second = overview(session, now=NOW)
    hour = second.last_hour.by_status
    assert (hour["running"], hour["failed"], hour["pending"]) == (0, 1, 1)
    assert hour["succeeded"] == 1  # the 20-minute-old insert: its minute was kept, not re-read


def _kept_minutes(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        kept = overview_module._kept_for(session)
    with kept.lock:
        return len(kept.minutes)


def test_warm_keeps_the_day_and_the_figures_stay_those_read_without_it(
    sessions: sessionmaker[Session],
) -> None:
    seed(sessions)
    warm(sessions, now=NOW)
    # Every settled minute of the day is kept (those with an unfinished run are read again).
    assert _kept_minutes(sessions) >= TIMELINE_MINUTES - 5
    with sessions() as session:
        warmed = overview(session, now=NOW)
        overview_module._KEPT.clear()  # the same day, read whole by the load itself
        read = overview(session, now=NOW)
    assert warmed.model_dump() == read.model_dump()
    assert warmed.last_hour.by_status["succeeded"] == 101


def test_keep_warm_reads_the_day_at_start_and_stops_with_the_manager(
    sessions: sessionmaker[Session],
) -> None:
    now = utcnow()
    with sessions() as session:
        session.add(NodeGroup(name="g1", created_at=now, updated_at=now))
        session.flush()
        task = add_task(session, "alpha")
        session.commit()
        session.execute(insert(JobLog), [run(task, now - timedelta(minutes=m)) for m in (9, 30)])
        session.commit()
    done = threading.Event()

    async def main() -> None:
        stop = asyncio.Event()
        warming = asyncio.create_task(keep_warm(sessions, stop))
        for _ in range(600):  # up to 60 s on a loaded machine
            if _kept_minutes(sessions) >= TIMELINE_MINUTES - 5:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(warming, 30)
        done.set()

    asyncio.run(main())
    assert done.is_set() and _kept_minutes(sessions) >= TIMELINE_MINUTES - 5
    with sessions() as session:
        assert overview(session).last_hour.by_status["succeeded"] == 2
