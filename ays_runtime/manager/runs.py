"""The life of a run after its slot is claimed: dispatched, finished, retried, reaped.

Every status change is one guarded UPDATE (`... WHERE status IN (unfinished)`), so a late
result, a duplicate report and a node-lost sweep can race without a run ever going back from
a final status. Changes arriving together share a transaction (group commit): a burst of
dispatches or results costs one commit, not one each. Failed runs are retried per the task's
policy, each attempt a row of its own (attempt + 1, same slot, same shard); a retry waits its
backoff in memory on this manager.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select, update

from ays_runtime.protocol import JobResultReport
from ays_runtime.scheduler.firing import Fire, claim_slots, load_tasks, make_dispatch
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.group_commit import GroupCommit
from ays_runtime.storage.models import (
    JobLog,
    Node,
    NodeStatus,
    RetryBackoff,
    RunStatus,
    Task,
    TriggerKind,
)
from ays_runtime.transport.base import JobDispatch

log = logging.getLogger("ays.runs")

UNFINISHED = (RunStatus.PENDING.value, RunStatus.DISPATCHED.value, RunStatus.RUNNING.value)
RETRYABLE = {RunStatus.FAILED.value, RunStatus.TIMED_OUT.value, RunStatus.NODE_LOST.value}
MAX_BACKOFF = 3600.0


@dataclass(frozen=True)
class _Final:
    """A run's final status, to be written (only if the run is still unfinished)."""

    job_id: int
    status: str
    message: str
    node: str = ""
    exit_code: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    output: str = ""


def retry_delay(backoff: str, interval: float, attempt: int) -> float:
    """Seconds to wait before attempt `attempt + 1`."""
    if backoff == RetryBackoff.EXPONENTIAL.value:
        return min(interval * (2**attempt), MAX_BACKOFF)
    return interval


class RunTracker:
    def __init__(
        self,
        engine: Engine,
        manager_id: str,
        excerpt_bytes: int,
        redispatch: Callable[[list[JobDispatch]], Awaitable[None]],
    ) -> None:
        self.engine = engine
        self.manager_id = manager_id
        self.excerpt_bytes = excerpt_bytes
        self.redispatch = redispatch
        self._retries: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_finished: Callable[[str], None] | None = None  # node address, for least-busy
        self._dispatch_writes = GroupCommit(self._write_dispatched)
        self._final_writes = GroupCommit(self._write_finals)

    # -- transitions ----------------------------------------------------------------------

    async def dispatched(self, job: JobDispatch, node: str) -> None:
        await self._dispatch_writes.submit((job.job_log_id, node))

    def _write_dispatched(self, handed: Sequence[tuple[int, str]]) -> list[None]:
        by_node: dict[str, list[int]] = {}
        for job_id, node in handed:
            by_node.setdefault(node, []).append(job_id)
        now = utcnow()
        with self.engine.begin() as conn:
            for node, ids in by_node.items():
                conn.execute(
                    update(JobLog)
                    .where(JobLog.id.in_(ids), JobLog.status == RunStatus.PENDING.value)
                    .values(status=RunStatus.DISPATCHED.value, node=node, started_at=now)
                )
        return [None] * len(handed)

    async def dispatch_failed(self, job: JobDispatch, message: str, node: str = "") -> None:
        log.warning(
            "manager %s: run %d of task %d: %s",
            self.manager_id,
            job.job_log_id,
            job.task_id,
            message,
        )
        await self._finish(job.job_log_id, RunStatus.FAILED.value, message, node=node)

    async def record_result(self, report: JobResultReport) -> bool:
        """Store a node's report; False when the run was already final (a duplicate)."""
        output = report.output
        if len(output.encode()) > self.excerpt_bytes:
            output = output.encode()[-self.excerpt_bytes :].decode("utf-8", "replace")
        changed = await self._finish(
            report.job_log_id,
            report.status,
            report.message,
            node=report.node,
            exit_code=report.exit_code,
            started_at=report.started_at,
            ended_at=report.ended_at,
            output=output,
        )
        if changed and self.on_finished is not None:
            self.on_finished(report.node)
        return changed

    async def node_lost(self, address: str) -> None:
        """Fail every unfinished run held by `address` as node lost, and retry per policy."""

        def lost_ids() -> list[int]:
            with self.engine.connect() as conn:
                return list(
                    conn.execute(
                        select(JobLog.id).where(
                            JobLog.node == address,
                            JobLog.status.in_(
                                (RunStatus.DISPATCHED.value, RunStatus.RUNNING.value)
                            ),
                        )
                    ).scalars()
                )

        for job_id in await asyncio.to_thread(lost_ids):
            log.warning("manager %s: run %d: node %s lost", self.manager_id, job_id, address)
            await self._finish(
                job_id, RunStatus.NODE_LOST.value, f"node {address} lost", node=address
            )

    async def reap_orphans(self) -> int:
        """Level-triggered repair: runs held by nodes that are offline now are node lost.

        Covers what an edge can miss: a manager restarted while the node died, or another
        manager saw the node go offline and died before handling its runs.
        """

        def offline_addresses() -> list[str]:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(Node.ip, Node.port).where(Node.status == NodeStatus.OFFLINE.value)
                ).all()
                addresses = [f"{r.ip}:{r.port}" for r in rows]
                if not addresses:
                    return []
                held = conn.execute(
                    select(JobLog.node)
                    .where(
                        JobLog.status.in_((RunStatus.DISPATCHED.value, RunStatus.RUNNING.value)),
                        JobLog.node.in_(addresses),
                    )
                    .distinct()
                ).scalars()
                return list(held)

        addresses = await asyncio.to_thread(offline_addresses)
        for address in addresses:
            await self.node_lost(address)
        return len(addresses)

    async def recover_pending(self) -> int:
        """Re-dispatch runs this manager claimed but never handed over (it stopped between)."""

        def pending() -> list[JobDispatch]:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(JobLog.id).where(
                        JobLog.manager_id == self.manager_id,
                        JobLog.status == RunStatus.PENDING.value,
                    )
                ).scalars()
                return [d for d in (self._load_dispatch(conn, i) for i in rows) if d is not None]

        jobs = await asyncio.to_thread(pending)
        if jobs:
            log.info(
                "manager %s: re-dispatching %d claimed runs left pending",
                self.manager_id,
                len(jobs),
            )
            await self.redispatch(jobs)
        return len(jobs)

    # -- broadcast shards -----------------------------------------------------------------

    async def claim_shards(self, job: JobDispatch, total: int) -> list[JobDispatch]:
        """Turn a claimed slot into `total` shard runs (shard 0 is the claim row itself)."""

        def claim() -> list[JobDispatch]:
            with self.engine.begin() as conn:
                conn.execute(
                    update(JobLog).where(JobLog.id == job.job_log_id).values(shard_total=total)
                )
            fires = [
                Fire(job.task_id, job.scheduled_at, job.trigger, job.params, job.attempt, i, total)
                for i in range(1, total)
            ]
            others = claim_slots(self.engine, self.manager_id, fires, utcnow())
            return [_with_shard(job, 0, total), *sorted(others, key=lambda d: d.shard_index)]

        return await asyncio.to_thread(claim)

    # -- internals ------------------------------------------------------------------------

    async def _finish(
        self,
        job_id: int,
        status: str,
        message: str,
        node: str = "",
        exit_code: int | None = None,
        started_at: datetime | None = None,
        ended_at: datetime | None = None,
        output: str = "",
    ) -> bool:
        final = _Final(job_id, status, message, node, exit_code, started_at, ended_at, output)
        changed, retry, delay = await self._final_writes.submit(final)
        if retry is not None:
            self._schedule_retry(retry, delay)
        return changed

    def _write_finals(
        self, finals: Sequence[_Final]
    ) -> list[tuple[bool, JobDispatch | None, float]]:
        answers: list[tuple[bool, JobDispatch | None, float]] = []
        with self.engine.begin() as conn:
            for final in finals:
                values: dict[str, Any] = {
                    "status": final.status,
                    "message": final.message[:1024],
                    "ended_at": final.ended_at or utcnow(),
                    "exit_code": final.exit_code,
                    "output": final.output,
                }
                if final.node:
                    values["node"] = final.node
                if final.started_at is not None:
                    values["started_at"] = final.started_at
                changed = conn.execute(
                    update(JobLog)
                    .where(JobLog.id == final.job_id, JobLog.status.in_(UNFINISHED))
                    .values(**values)
                ).rowcount
                if not changed or final.status not in RETRYABLE:
                    answers.append((bool(changed), None, 0.0))
                else:
                    answers.append((True, *self._next_attempt(conn, final.job_id)))
        return answers

    def _next_attempt(self, conn: Any, job_id: int) -> tuple[JobDispatch | None, float]:
        row = conn.execute(
            select(
                JobLog.task_id,
                JobLog.attempt,
                Task.retry_count,
                Task.retry_backoff,
                Task.retry_interval_s,
                Task.enabled,
            )
            .join(Task, Task.id == JobLog.task_id)
            .where(JobLog.id == job_id)
        ).first()
        if row is None or row.attempt >= row.retry_count or not row.enabled:
            return None, 0.0
        job = self._load_dispatch(conn, job_id)
        return job, retry_delay(row.retry_backoff, row.retry_interval_s, row.attempt)

    @staticmethod
    def _load_dispatch(conn: Any, job_id: int) -> JobDispatch | None:
        r = conn.execute(
            select(
                JobLog.task_id,
                JobLog.scheduled_at,
                JobLog.trigger,
                JobLog.attempt,
                JobLog.params,
                JobLog.shard_index,
                JobLog.shard_total,
            ).where(JobLog.id == job_id)
        ).first()
        if r is None:
            return None
        task = load_tasks(conn, {r.task_id}).get(r.task_id)
        if task is None:
            return None
        return make_dispatch(
            task,
            job_id,
            r.scheduled_at,
            r.trigger,
            r.attempt,
            r.params,
            r.shard_index,
            r.shard_total,
        )

    def _schedule_retry(self, failed: JobDispatch, delay: float) -> None:
        log.info(
            "manager %s: run %d of task %d: attempt %d in %.1fs",
            self.manager_id,
            failed.job_log_id,
            failed.task_id,
            failed.attempt + 1,
            delay,
        )
        loop = asyncio.get_running_loop()

        def due() -> None:
            self._retries.discard(handle)
            task = loop.create_task(self._retry(failed))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        handle = loop.call_later(delay, due)
        self._retries.add(handle)

    async def _retry(self, failed: JobDispatch) -> None:
        fire = Fire(
            failed.task_id,
            failed.scheduled_at,
            TriggerKind.RETRY.value,
            failed.params,
            failed.attempt + 1,
            failed.shard_index,
            failed.shard_total,
        )
        jobs = await asyncio.to_thread(claim_slots, self.engine, self.manager_id, [fire], utcnow())
        if jobs:  # empty: another manager already retried this attempt
            await self.redispatch(jobs)

    async def stop(self) -> None:
        """Forget retries still waiting (documented: a waiting retry does not survive a stop)."""
        for handle in self._retries:
            handle.cancel()
        self._retries.clear()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)


def _with_shard(job: JobDispatch, index: int, total: int) -> JobDispatch:
    return replace(job, shard_index=index, shard_total=total)
