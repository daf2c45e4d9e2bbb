"""Job logs (and what ages with them) older than the retention are purged in bounded
batches; newer ones stay."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import Engine, event, func, insert, select

from ays_runtime.manager.retention import (
    FAN_IN_PARENTS,
    FAN_INS,
    WITH_JOB_LOGS,
    purge_batch,
    purge_old,
)
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import FanIn, FanInParent, JobLog


def add_logs(engine: Engine, count: int, age: timedelta, first_task: int) -> None:
    created = utcnow() - age
    rows = [
        {
            "task_id": first_task + i,
            "scheduled_at": created,
            "created_at": created,
            "status": "succeeded",
            "output": "",
            "message": "",
        }
        for i in range(count)
    ]
    with engine.begin() as conn:
        conn.execute(insert(JobLog), rows)


def count_logs(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(JobLog)).scalar_one())


@contextmanager
def recorded_deletes(engine: Engine) -> Iterator[list[str]]:
    """The DELETE statements the engine runs in the block."""
    deletes: list[str] = []

    def record(_conn, _cursor, statement: str, *_args: object) -> None:  # noqa: ANN001
        if statement.lstrip().upper().startswith("DELETE"):
            deletes.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield deletes
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_old_job_logs_are_purged_in_batches_and_recent_ones_kept(engine: Engine) -> None:
    add_logs(engine, 250, timedelta(days=40), first_task=1)
    add_logs(engine, 30, timedelta(days=1), first_task=10_000)
    with recorded_deletes(engine) as deletes:
        purged = asyncio.run(purge_old(engine, timedelta(days=30), batch=100))
    assert purged == 250
    assert len(deletes) == 3  # 100 + 100 + 50: bounded statements, never one huge delete
    assert count_logs(engine) == 30


def test_a_purge_with_nothing_old_deletes_nothing(engine: Engine) -> None:
    add_logs(engine, 5, timedelta(hours=1), first_task=1)
    assert purge_batch(engine, timedelta(days=30), 100) == 0
    assert count_logs(engine) == 5


def add_fan_ins(engine: Engine, slots: int, age: timedelta, parents: int) -> None:
    """Counters of `slots` slots of one fan-in child, `parents` parents counted in each."""
    first = utcnow().replace(microsecond=0) - age
    at = [first + timedelta(seconds=i) for i in range(slots)]
    with engine.begin() as conn:
        conn.execute(
            insert(FanIn),
            [
                {"child_id": 7, "scheduled_at": a, "met": parents, "needed": parents, "claim": "c"}
                for a in at
            ],
        )
        conn.execute(
            insert(FanInParent),
            [
                {"child_id": 7, "scheduled_at": a, "parent_id": p, "claim": "c"}
                for a in at
                for p in range(1, parents + 1)
            ],
        )


def count_rows(engine: Engine, model: object) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def test_the_fan_in_counters_of_old_slots_are_purged_with_the_job_logs_in_batches(
    engine: Engine,
) -> None:
    assert {FAN_INS, FAN_IN_PARENTS} <= set(WITH_JOB_LOGS)  # job_log.retention_days
    add_fan_ins(engine, 120, timedelta(days=40), parents=3)
    add_fan_ins(engine, 10, timedelta(days=1), parents=3)
    with recorded_deletes(engine) as deletes:
        counters = asyncio.run(purge_old(engine, timedelta(days=30), 50, FAN_INS))
        parents = asyncio.run(purge_old(engine, timedelta(days=30), 100, FAN_IN_PARENTS))
    assert (counters, parents) == (120, 360)
    assert len(deletes) == 3 + 4  # 50 + 50 + 20, then 100 x 3 + 60: bounded statements
    assert count_rows(engine, FanIn) == 10
    assert count_rows(engine, FanInParent) == 30
    with engine.connect() as conn:
        oldest = conn.execute(select(func.min(FanInParent.scheduled_at))).scalar_one()
    assert oldest > utcnow() - timedelta(days=2)  # the recent slots are whole
