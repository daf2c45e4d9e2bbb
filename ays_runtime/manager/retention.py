"""Purging job logs (and audit entries, sign-in counts) older than the env's retention, in
bounded batches, off the hot path.

Each batch is one short DELETE by primary key (ids selected first, oldest first), followed
by a pause, so a purge of millions of rows never holds a long lock against the claim writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, delete, select
from sqlalchemy.exc import SQLAlchemyError

from ays_runtime.metrics import manager as metrics
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import AuditEntry, JobLog, SignInLimit, SlotMiss

log = logging.getLogger("ays.retention")

PURGE_INTERVAL = 300.0
PAUSE_BETWEEN_BATCHES = 0.05


@dataclass(frozen=True)
class Aged:
    """Rows that age out: a table (its `id` column) and the column that dates a row."""

    what: str  # as the log says it
    model: Any
    stamp: Any


JOB_LOGS = Aged("job logs", JobLog, JobLog.created_at)
AUDIT_ENTRIES = Aged("audit entries", AuditEntry, AuditEntry.at)
# The slot ledger's ranges age with the job log they complete: by their last slot.
SLOT_MISSES = Aged("slot-ledger ranges", SlotMiss, SlotMiss.end_at)
# A sign-in count ages by its last failure: past the window and the lock-out, it holds nothing.
SIGN_IN_LIMITS = Aged("sign-in counts", SignInLimit, SignInLimit.last_at)


def purge_batch(engine: Engine, retention: timedelta, batch: int, rows: Aged = JOB_LOGS) -> int:
    """Delete up to `batch` rows dated before now - retention; returns how many."""
    cutoff = utcnow() - retention
    key = rows.model.id
    with engine.begin() as conn:
        ids = list(
            conn.execute(
                select(key).where(rows.stamp < cutoff).order_by(key).limit(batch)
            ).scalars()
        )
        if ids:
            conn.execute(delete(rows.model).where(key.in_(ids)))
    metrics.PURGED_ROWS.labels(rows.model.__tablename__).inc(len(ids))
    return len(ids)


async def purge_old(engine: Engine, retention: timedelta, batch: int, rows: Aged = JOB_LOGS) -> int:
    total = 0
    while True:
        deleted = await asyncio.to_thread(purge_batch, engine, retention, batch, rows)
        total += deleted
        if deleted < batch:
            return total
        await asyncio.sleep(PAUSE_BETWEEN_BATCHES)


async def retention_loop(
    engine: Engine,
    retentions: dict[Aged, timedelta],
    batch: int,
    stopping: asyncio.Event,
    interval: float = PURGE_INTERVAL,
) -> None:
    while not stopping.is_set():
        for rows, retention in retentions.items():
            try:
                purged = await purge_old(engine, retention, batch, rows)
                if purged:
                    log.info("manager: purged %d %s older than %s", purged, rows.what, retention)
            except SQLAlchemyError as err:
                log.warning(
                    "manager: purge of %s failed, will try again: %s",
                    rows.what,
                    getattr(err, "orig", None) or err,
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval)
