"""Purging job logs older than the env's retention, in bounded batches, off the hot path.

Each batch is one short DELETE by primary key (ids selected first, oldest first), followed
by a pause, so a purge of millions of rows never holds a long lock against the claim writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from sqlalchemy import Engine, delete, select
from sqlalchemy.exc import SQLAlchemyError

from ays_runtime.metrics import manager as metrics
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import JobLog

log = logging.getLogger("ays.retention")

PURGE_INTERVAL = 300.0
PAUSE_BETWEEN_BATCHES = 0.05


def purge_batch(engine: Engine, retention: timedelta, batch: int) -> int:
    """Delete up to `batch` job logs created before now - retention; returns how many."""
    cutoff = utcnow() - retention
    with engine.begin() as conn:
        ids = list(
            conn.execute(
                select(JobLog.id).where(JobLog.created_at < cutoff).order_by(JobLog.id).limit(batch)
            ).scalars()
        )
        if ids:
            conn.execute(delete(JobLog).where(JobLog.id.in_(ids)))
    metrics.JOB_LOGS_PURGED.inc(len(ids))
    return len(ids)


async def purge_old_job_logs(engine: Engine, retention: timedelta, batch: int) -> int:
    total = 0
    while True:
        deleted = await asyncio.to_thread(purge_batch, engine, retention, batch)
        total += deleted
        if deleted < batch:
            return total
        await asyncio.sleep(PAUSE_BETWEEN_BATCHES)


async def retention_loop(
    engine: Engine,
    retention: timedelta,
    batch: int,
    stopping: asyncio.Event,
    interval: float = PURGE_INTERVAL,
) -> None:
    while not stopping.is_set():
        try:
            purged = await purge_old_job_logs(engine, retention, batch)
            if purged:
                log.info("manager: purged %d job logs older than %s", purged, retention)
        except SQLAlchemyError as err:
            log.warning(
                "manager: job-log purge failed, will try again: %s",
                getattr(err, "orig", None) or err,
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval)
