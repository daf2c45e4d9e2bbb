"""Job logs older than the retention are purged in bounded batches; newer ones stay."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import Engine, event, func, insert, select

from ays_runtime.manager.retention import purge_batch, purge_old
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import JobLog


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


def test_old_job_logs_are_purged_in_batches_and_recent_ones_kept(engine: Engine) -> None:
    add_logs(engine, 250, timedelta(days=40), first_task=1)
    add_logs(engine, 30, timedelta(days=1), first_task=10_000)
    deletes: list[str] = []

    def record(_conn, _cursor, statement: str, *_args: object) -> None:  # noqa: ANN001
        if statement.lstrip().upper().startswith("DELETE"):
            deletes.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        purged = asyncio.run(purge_old(engine, timedelta(days=30), batch=100))
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert purged == 250
    assert len(deletes) == 3  # 100 + 100 + 50: bounded statements, never one huge delete
    assert count_logs(engine) == 30


def test_a_purge_with_nothing_old_deletes_nothing(engine: Engine) -> None:
    add_logs(engine, 5, timedelta(hours=1), first_task=1)
    assert purge_batch(engine, timedelta(days=30), 100) == 0
    assert count_logs(engine) == 5
