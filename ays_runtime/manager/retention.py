"""Purging job logs (and what ages with them: the slot ledger, the fan-in counters of
dependencies), audit entries and sign-in counts older than their retention, in bounded
batches, off the hot path.

Each batch is one short DELETE by primary key (keys selected first, oldest first), followed
by a pause, so a purge of millions of rows never holds a long lock against the claim writer.
Each batch is a transaction of the retry policy (`transaction`): a deadlock with a writer is
tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, Engine, delete, select, tuple_
from sqlalchemy.exc import SQLAlchemyError

from ays_runtime.metrics import manager as metrics
from ays_runtime.storage.database import transaction, utcnow
from ays_runtime.storage.models import (
    AuditEntry,
    FanIn,
    FanInParent,
    JobLog,
    SignInLimit,
    SlotMiss,
)

log = logging.getLogger("ays.retention")

PURGE_INTERVAL = 300.0
PAUSE_BETWEEN_BATCHES = 0.05


@dataclass(frozen=True)
class Aged:
    """Rows that age out: a table (deleted by its primary key) and the column that dates a
    row (indexed: a batch reads the oldest rows by it)."""

    what: str  # as the log says it
    model: Any
    stamp: Any


JOB_LOGS = Aged("job logs", JobLog, JobLog.created_at)
AUDIT_ENTRIES = Aged("audit entries", AuditEntry, AuditEntry.at)
# The slot ledger's ranges age with the job log they complete: by their last slot.
SLOT_MISSES = Aged("slot-ledger ranges", SlotMiss, SlotMiss.end_at)
# A sign-in count ages by its last failure: past the window and the lock-out, it holds nothing.
SIGN_IN_LIMITS = Aged("sign-in counts", SignInLimit, SignInLimit.last_at)
# A fan-in's counters age with the job logs of their slot: by the slot. A slot still going
# that late (a parent ending after the retention) is counted again from its job logs.
FAN_INS = Aged("fan-in counters", FanIn, FanIn.scheduled_at)
FAN_IN_PARENTS = Aged("fan-in parents counted", FanInParent, FanInParent.scheduled_at)
# The rows purged with `job_log.retention_days`.
WITH_JOB_LOGS = (JOB_LOGS, SLOT_MISSES, FAN_INS, FAN_IN_PARENTS)


def purge_batch(engine: Engine, retention: timedelta, batch: int, rows: Aged = JOB_LOGS) -> int:
    """Delete up to `batch` rows dated before now - retention; returns how many."""
    cutoff = utcnow() - retention
    columns = list(rows.model.__table__.primary_key.columns)
    key = columns[0] if len(columns) == 1 else tuple_(*columns)

    def purge(conn: Connection) -> int:
        keys = conn.execute(
            select(*columns).where(rows.stamp < cutoff).order_by(rows.stamp, *columns).limit(batch)
        ).all()
        if keys:
            found = [k[0] for k in keys] if len(columns) == 1 else [tuple(k) for k in keys]
            conn.execute(delete(rows.model).where(key.in_(found)))
        return len(keys)

    deleted = transaction(engine, purge, f"manager: purging {rows.what}")
    metrics.PURGED_ROWS.labels(rows.model.__tablename__).inc(deleted)
    return deleted


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
