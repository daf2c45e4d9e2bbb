"""Claiming fired slots in the job log, in batches.

A fire is only real once its job-log row exists. Rows are inserted with "insert, or do nothing
if the slot key exists" (`uq_job_log_slot`), so when two managers, a restart or a retry fire
the same slot, exactly one insert wins and only the winner dispatches. MySQL has no
RETURNING, so each batch carries a random claim token and the winner learns its rows by
selecting that token.

Batching is what makes thousands of fires per second possible: one INSERT (multi-row) and two
SELECTs per batch, not per fire.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import SQLAlchemyError

from ays_runtime.dependencies.results import with_parent_results
from ays_runtime.metrics import manager as metrics
from ays_runtime.scheduler.ledger import OwedRange, record_owed
from ays_runtime.storage.database import insert_ignoring_duplicates, transaction, utcnow
from ays_runtime.storage.models import JobLog, RunStatus, Task, TriggerKind
from ays_runtime.transport.base import JobDispatch

log = logging.getLogger("ays.firing")

MAX_BATCH = 2000
# How long the first fire of a batch may wait for company. Small: lateness is measured from
# the slot time, and a lone fire should not wait at all when the writer is idle.
MAX_BATCH_DELAY = 0.002
# Slot-ledger ranges written with one claim batch: a manager starting after a long stop finds
# one per task, and counting their slots must not hold the claims back for long.
MAX_OWED_BATCH = 500


@dataclass(frozen=True)
class Fire:
    task_id: int
    scheduled_at: datetime
    trigger: str = TriggerKind.CRON.value
    params: str | None = None  # None: the task's own params
    # Retries and broadcast shards are further rows of the same slot.
    attempt: int = 0
    shard_index: int = 0
    shard_total: int = 1
    due_at: datetime | None = None  # a retry: not dispatched before its backoff has passed


def claim_slots(
    engine: Engine, manager_id: str, fires: Sequence[Fire], now: datetime
) -> list[JobDispatch]:
    """Insert the fires' job-log rows; return the dispatches for the rows this call won."""
    return transaction(
        engine,
        lambda conn: claim_in(conn, manager_id, fires, now),
        f"manager {manager_id}: claiming {len(fires)} slot(s)",
    )


def claim_in(
    conn: Connection, manager_id: str, fires: Sequence[Fire], now: datetime
) -> list[JobDispatch]:
    """`claim_slots` inside the caller's transaction."""
    task_ids = {f.task_id for f in fires}
    tasks = load_tasks(conn, task_ids)
    token = uuid.uuid4().hex
    rows = []
    for f in fires:
        task = tasks.get(f.task_id)
        if task is None:
            continue  # deleted between the timer firing and now
        if f.trigger != TriggerKind.MANUAL.value and not task["enabled"]:
            continue  # disabled after the timer fired: a disabled task runs only by hand
        rows.append(
            {
                "task_id": f.task_id,
                "scheduled_at": f.scheduled_at,
                "trigger": f.trigger,
                "attempt": f.attempt,
                "shard_index": f.shard_index,
                "shard_total": f.shard_total,
                "params": task["params"] if f.params is None else f.params,
                "claim": token,
                "manager_id": manager_id,
                "node": "",
                "status": RunStatus.PENDING.value,
                "created_at": now,
                "due_at": f.due_at,
                "output": "",
                "message": "",
            }
        )
    if not rows:
        return []
    insert_ignoring_duplicates(conn, JobLog, rows, keep="claim")
    won = conn.execute(select(*_CLAIMED_COLUMNS).where(JobLog.claim == token)).all()
    dispatches = [
        make_dispatch(
            tasks[r.task_id],
            r.id,
            r.scheduled_at,
            r.trigger,
            r.attempt,
            r.params,
            r.shard_index,
            r.shard_total,
        )
        for r in won
    ]
    return with_parent_results(conn, dispatches)


_CLAIMED_COLUMNS = (
    JobLog.id,
    JobLog.task_id,
    JobLog.scheduled_at,
    JobLog.trigger,
    JobLog.attempt,
    JobLog.params,
    JobLog.shard_index,
    JobLog.shard_total,
)


_TASK_COLUMNS = (
    Task.id,
    Task.name,
    Task.node_group,
    Task.enabled,
    Task.params,
    Task.task_type,
    Task.payload,
    Task.timeout_s,
    Task.route_strategy,
    Task.block_strategy,
    Task.retry_count,
    Task.retry_backoff,
    Task.retry_interval_s,
)


def load_tasks(conn: Connection, task_ids: set[int]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    ids = list(task_ids)
    for start in range(0, len(ids), 5000):
        stmt = select(*_TASK_COLUMNS).where(Task.id.in_(ids[start : start + 5000]))
        for row in conn.execute(stmt).mappings():
            out[row["id"]] = dict(row)
    return out


def make_dispatch(
    task: dict[str, Any],
    job_log_id: int,
    scheduled_at: datetime,
    trigger: str,
    attempt: int,
    params: str,
    shard_index: int = 0,
    shard_total: int = 1,
) -> JobDispatch:
    return JobDispatch(
        job_log_id=job_log_id,
        task_id=task["id"],
        task_name=task["name"],
        node_group=task["node_group"],
        scheduled_at=scheduled_at,
        trigger=trigger,
        attempt=attempt,
        params=params,
        task_type=task["task_type"],
        payload=task["payload"],
        timeout_s=task["timeout_s"],
        route_strategy=task["route_strategy"],
        block_strategy=task["block_strategy"],
        retry_count=task["retry_count"],
        retry_backoff=task["retry_backoff"],
        retry_interval_s=task["retry_interval_s"],
        shard_index=shard_index,
        shard_total=shard_total,
    )


class FireWriter:
    """Collects fires from the event loop and claims them in batches in a worker thread.

    `submit` never blocks the fire loop. `close` flushes what was submitted: a clean stop
    leaves no slot half-fired. `note_missed` queues a slot-ledger range (scheduler/ledger.py),
    written in the transaction of the next batch.
    """

    def __init__(
        self,
        engine: Engine,
        manager_id: str,
        on_claimed: Callable[[list[JobDispatch]], Awaitable[None]],
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.engine = engine
        self.manager_id = manager_id
        self.on_claimed = on_claimed
        self.max_batch = max_batch
        self._queue: list[Fire] = []
        self._owed: list[OwedRange] = []
        self._waiters: dict[tuple[int, datetime], asyncio.Future[int | None]] = {}
        self._wakeup = asyncio.Event()
        self._closing = False
        self._failing = False
        self.claimed_total = 0

    def submit(self, fire: Fire) -> None:
        self._queue.append(fire)
        self._wakeup.set()

    def note_missed(self, owed: OwedRange) -> None:
        self._owed.append(owed)
        self._wakeup.set()

    async def submit_and_wait(self, fire: Fire) -> int | None:
        """Submit and wait for the claim; the job-log id, or None if the slot was taken."""
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._waiters[(fire.task_id, fire.scheduled_at)] = future
        self.submit(fire)
        return await future

    @property
    def backlog(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        while True:
            if not self._queue and not self._owed:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._queue) < self.max_batch and not self._closing:
                await asyncio.sleep(MAX_BATCH_DELAY)
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            owed = self._owed[:MAX_OWED_BATCH]
            del self._owed[:MAX_OWED_BATCH]
            await self._claim(batch, owed)

    def _write(
        self, batch: list[Fire], owed: list[OwedRange]
    ) -> tuple[list[JobDispatch], Counter[str]]:
        """The batch's claims and ledger ranges, in one transaction (worker thread)."""
        now = utcnow()

        def work(conn: Connection) -> tuple[list[JobDispatch], Counter[str]]:
            dispatches = claim_in(conn, self.manager_id, batch, now) if batch else []
            return dispatches, record_owed(conn, self.manager_id, owed, now)

        what = f"manager {self.manager_id}: claiming {len(batch)} slot(s)"
        if owed:
            what += f", recording {len(owed)} range(s) of slots not fired"
        return transaction(self.engine, work, what)

    async def _claim(self, batch: list[Fire], owed: list[OwedRange]) -> None:
        try:
            dispatches, recorded = await asyncio.to_thread(self._write, batch, owed)
        except SQLAlchemyError as err:
            # The database is away: keep the fires and try again; the slot key makes the
            # retry safe. Logged once per outage, not once per attempt.
            if not self._failing:
                reason = getattr(err, "orig", None) or err
                log.error("manager %s: cannot claim fires, will retry: %s", self.manager_id, reason)
                self._failing = True
            self._queue[:0] = batch
            self._owed[:0] = owed
            await asyncio.sleep(1.0 if not self._closing else 0.2)
            return
        if self._failing:
            log.warning("manager %s: database is back, claiming again", self.manager_id)
            self._failing = False
        self.claimed_total += len(dispatches)
        metrics.slots_not_fired(recorded)
        metrics.fires_claimed(dispatches, utcnow())
        won = {(d.task_id, d.scheduled_at): d.job_log_id for d in dispatches}
        for fire in batch:
            future = self._waiters.pop((fire.task_id, fire.scheduled_at), None)
            if future is not None and not future.done():
                future.set_result(won.get((fire.task_id, fire.scheduled_at)))
        if dispatches:
            await self.on_claimed(dispatches)

    def close(self) -> None:
        """Make `run` return once everything submitted is claimed (the caller bounds the wait)."""
        self._closing = True
        self._wakeup.set()
