"""The life of a run after its slot is claimed: dispatched, finished, retried, reaped.

Every status change is guarded (only a run still unfinished changes): a guarded UPDATE, or
for a batch of final statuses a locking read of the batch's unfinished runs, each guard
decided on them, then the UPDATEs. So a late result, a duplicate report and a node-lost sweep
can race without a run ever going back from a final status. Changes arriving together share
a transaction (group commit): a burst of dispatches or results costs one commit, not one
each. Failed runs are retried per the task's policy, each attempt a row of its own (attempt
+ 1, same slot, same shard). The retry's row is written with the failure, in the same
transaction, as a pending row due when its backoff has passed (`due_at`): a manager that
stops, crashes or reloads while a retry waits loses none, as its next process dispatches the
row when it is due (`recover_pending`).

A run whose node was lost (`node_lost`) may still be running there: the node's process died,
or the network between went down, and its job did not. Its retry is not sent elsewhere while
that may be so: the retry's row is held (due at the end of the run's timeout, plus
LOST_RUN_GRACE; LOST_RUN_HOLD when the task has none) and released at once when the node
reports the run ended (`record_result` of a run already final: a node that restarted ends the
jobs its earlier process left and reports them, see `node.journal`). If the node reports that
the run succeeded after all, the retry is skipped. A task with `allow_concurrent_retry` is
retried after its backoff alone, as any failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, select, update

from ays_runtime.dependencies.results import with_parent_results
from ays_runtime.dependencies.triggers import fire_children
from ays_runtime.metrics import manager as metrics
from ays_runtime.protocol import JobResultReport, StartClaimAnswer
from ays_runtime.scheduler.firing import Fire, claim_in, claim_slots, load_tasks, make_dispatch
from ays_runtime.storage.database import take_write_lock, transaction, utcnow
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
# A lost run's retry waits for its node's word at most until the run's timeout has passed,
# plus this (the node's kill grace, the SIGKILL wait, a result on its way) ...
LOST_RUN_GRACE = 60.0
# ... or, for a task without a timeout, this long: nothing bounds how long its old process
# may run, and a slot must be retried some day if its node never comes back.
LOST_RUN_HOLD = 3600.0


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
    unstarted: bool = False  # end it only if no node has started it (a dispatch failure)
    result: str = ""  # the job's JSON result (AYS_RESULT_FILE), "" for none


# A final's answer: stored (False: it had ended), its retry and the retry's delay, and the
# children's runs its slot's end claimed (ays_runtime.dependencies).
_Answer = tuple[bool, JobDispatch | None, float, list[JobDispatch]]


def retry_delay(backoff: str, interval: float, attempt: int) -> float:
    """Seconds to wait before attempt `attempt + 1`."""
    if backoff == RetryBackoff.EXPONENTIAL.value:
        return min(interval * (2**attempt), MAX_BACKOFF)
    return interval


def lost_run_hold(started_at: datetime | None, timeout_s: int) -> float:
    """Seconds from now until a lost run's old process can no longer be running, as far as
    the manager can tell (see LOST_RUN_GRACE, LOST_RUN_HOLD)."""
    if timeout_s <= 0:
        return LOST_RUN_HOLD
    ends = (started_at or utcnow()) + timedelta(seconds=timeout_s + LOST_RUN_GRACE)
    return max((ends - utcnow()).total_seconds(), 0.0)


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
        # Ids of runs just stored final, from the writer's thread (alerts: thread-safe, no I/O).
        self.on_stored: Callable[[list[int]], None] | None = None
        self._dispatch_writes = GroupCommit(self._write_dispatched)
        self._claim_writes = GroupCommit(self._write_claims)
        self._final_writes = GroupCommit(self._write_finals)

    # -- transitions ----------------------------------------------------------------------

    async def dispatched(self, job: JobDispatch, node: str) -> None:
        metrics.run_dispatched(job, "dispatched")
        await self._dispatch_writes.submit((job.job_log_id, node))
        metrics.run_dispatched(job, "stored")

    def _write_dispatched(self, handed: Sequence[tuple[int, str]]) -> list[None]:
        by_node: dict[str, list[int]] = {}
        for job_id, node in handed:
            by_node.setdefault(node, []).append(job_id)
        now = utcnow()

        def write(conn: Connection) -> list[None]:
            for node, ids in by_node.items():
                conn.execute(
                    update(JobLog)
                    .where(JobLog.id.in_(ids), JobLog.status == RunStatus.PENDING.value)
                    .values(status=RunStatus.DISPATCHED.value, node=node, started_at=now)
                )
            return [None] * len(handed)

        return transaction(self.engine, write, f"manager {self.manager_id}: recording dispatches")

    async def claim_start(self, job_id: int, node: str) -> StartClaimAnswer:
        """Record that `node` starts run `job_id`, if no node has: pending or dispatched ->
        running (with the node and the start time). Claims arriving together share one
        transaction. The answer says whether `node` won, and else who holds the run now."""
        return await self._claim_writes.submit((job_id, node))

    def _write_claims(self, claims: Sequence[tuple[int, str]]) -> list[StartClaimAnswer]:
        """A batch of claims in three statements, whatever its size: the rows as they were
        (locked, see `take_write_lock`), one guarded UPDATE per claiming node, the rows as
        they are. A claim won when its row was startable and is now running with its node; of
        two claims of one run in the batch, the first counts."""
        now = utcnow()
        startable = (RunStatus.PENDING.value, RunStatus.DISPATCHED.value)
        first: dict[int, str] = {}
        for job_id, node in claims:
            first.setdefault(job_id, node)
        by_node: dict[str, list[int]] = {}
        for job_id, node in first.items():
            by_node.setdefault(node, []).append(job_id)

        def rows(conn: Connection, lock: bool = False) -> dict[int, tuple[str, str]]:
            query = select(JobLog.id, JobLog.status, JobLog.node).where(JobLog.id.in_(first))
            if lock:
                query = query.with_for_update()
            return {r.id: (r.status, r.node or "") for r in conn.execute(query)}

        def write(conn: Connection) -> list[StartClaimAnswer]:
            take_write_lock(conn)
            before = rows(conn, lock=True)
            for node, ids in by_node.items():
                conn.execute(
                    update(JobLog)
                    .where(JobLog.id.in_(ids), JobLog.status.in_(startable))
                    .values(status=RunStatus.RUNNING.value, node=node, started_at=now)
                )
            after = rows(conn)
            answers = []
            for job_id, node in claims:
                status, holder = after.get(job_id, ("", ""))
                won = (
                    before.get(job_id, ("", ""))[0] in startable
                    and (status, holder) == (RunStatus.RUNNING.value, node)
                    and first[job_id] == node
                )
                answers.append(
                    StartClaimAnswer(job_log_id=job_id, claimed=won, status=status, node=holder)
                )
                if won:
                    first[job_id] = ""  # a second claim of the run by the same node loses
            return answers

        what = f"manager {self.manager_id}: recording {len(claims)} run start(s)"
        return transaction(self.engine, write, what)

    async def dispatch_failed(self, job: JobDispatch, message: str) -> None:
        """The run could not be handed over: failed, and retried per policy, unless a node
        has claimed its start meanwhile (a hand-over that timed out may have reached its node,
        a RocketMQ send stored but unanswered was delivered): then it is that node's to end,
        and a retry now would run the slot twice at once."""
        log.warning(
            "manager %s: run %d of task %d: %s",
            self.manager_id,
            job.job_log_id,
            job.task_id,
            message,
        )
        if not await self._finish(job.job_log_id, RunStatus.FAILED.value, message, unstarted=True):
            log.info(
                "manager %s: run %d: not failed: a node started it meanwhile, or it ended",
                self.manager_id,
                job.job_log_id,
            )

    async def end_killed(self, job_id: int, message: str) -> bool:
        """End an unfinished run as killed (no retry); False when it had ended already."""
        return await self._finish(job_id, RunStatus.KILLED.value, message)

    async def record_result(self, report: JobResultReport) -> bool:
        """Store a node's report; False when the run was already final (a duplicate)."""
        output = report.output
        result, message = report.result, report.message
        if result:
            try:
                json.loads(result)
            except ValueError:  # a node's word: the children must get JSON
                result, message = "", f"{message}; result is not JSON: not kept"
        if len(output.encode()) > self.excerpt_bytes:
            output = output.encode()[-self.excerpt_bytes :].decode("utf-8", "replace")
        changed = await self._finish(
            report.job_log_id,
            report.status,
            message,
            node=report.node,
            exit_code=report.exit_code,
            started_at=report.started_at,
            ended_at=report.ended_at,
            output=output,
            result=result,
        )
        if changed and self.on_finished is not None:
            self.on_finished(report.node)
        if not changed:
            await self._release_held(report)
        return changed

    async def _release_held(self, report: JobResultReport) -> None:
        """The node of a lost run reports it ended: its held retry may go now (or is skipped
        when the run succeeded after all). The retry's row is taken over by compare-and-set,
        so a manager whose timer still waits for it does not send it too."""

        def release() -> tuple[JobDispatch | None, list[JobDispatch]]:
            with self.engine.connect() as conn:  # most duplicates are of no lost run: a read
                lost = conn.execute(
                    select(
                        JobLog.task_id,
                        JobLog.scheduled_at,
                        JobLog.shard_index,
                        JobLog.attempt,
                        JobLog.status,
                        Task.allow_concurrent_retry,
                    )
                    .join(Task, Task.id == JobLog.task_id)
                    .where(JobLog.id == report.job_log_id)
                ).first()
            if (
                lost is None
                or lost.status != RunStatus.NODE_LOST.value
                or lost.allow_concurrent_retry
            ):
                return None, []
            return transaction(
                self.engine,
                lambda conn: self._release_held_in(conn, report, lost),
                f"manager {self.manager_id}: run {report.job_log_id}: releasing its held retry",
            )

        retry, children = await asyncio.to_thread(release)
        if children:  # claimed with the slot's end: pending rows of this manager's
            await self.redispatch(children)
        if retry is not None:
            log.info(
                "manager %s: run %d ended on node %s (%s): its held retry %d goes now",
                self.manager_id,
                report.job_log_id,
                report.node,
                report.status,
                retry.job_log_id,
            )
            await self.redispatch([retry])

    def _release_held_in(
        self, conn: Connection, report: JobResultReport, lost: Any
    ) -> tuple[JobDispatch | None, list[JobDispatch]]:
        """In one transaction (run again from the start on a transient error): the held
        retry of the `lost` run skipped, with the children its slot's end fires, when the
        node says the run succeeded; else the retry taken over by compare-and-set, to send."""
        held = conn.execute(
            select(JobLog.id).where(
                JobLog.task_id == lost.task_id,
                JobLog.scheduled_at == lost.scheduled_at,
                JobLog.shard_index == lost.shard_index,
                JobLog.attempt == lost.attempt + 1,
                JobLog.status == RunStatus.PENDING.value,
            )
        ).scalar()
        if held is None:
            return None, []
        now = utcnow()
        if report.status == RunStatus.SUCCEEDED.value:
            conn.execute(
                update(JobLog)
                .where(JobLog.id == held, JobLog.status == RunStatus.PENDING.value)
                .values(
                    status=RunStatus.SKIPPED.value,
                    message=f"not retried: run {report.job_log_id} succeeded on node "
                    f"{report.node} after all",
                    ended_at=now,
                )
            )
            log.info(
                "manager %s: run %d: node %s reports it succeeded after all: its retry %d "
                "is skipped",
                self.manager_id,
                report.job_log_id,
                report.node,
                held,
            )
            # Its slot has ended (skipped): its children are decided with it.
            slot = [(lost.task_id, lost.scheduled_at)]
            return None, fire_children(conn, self.manager_id, slot, now)
        taken = conn.execute(
            update(JobLog)
            .where(JobLog.id == held, JobLog.status == RunStatus.PENDING.value)
            .values(manager_id=self.manager_id, due_at=now)
        ).rowcount
        return (self._load_dispatch(conn, held) if taken else None), []

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

    async def recover_pending(self, claim: str | None = None) -> int:
        """Dispatch the runs this manager claimed but never handed over (it stopped between),
        and the retries it left waiting: each when it is due. With `claim`, only the rows of
        that claim token (runs just adopted from a silent manager)."""

        def pending() -> list[tuple[JobDispatch, datetime | None]]:
            mine = [
                JobLog.manager_id == self.manager_id,
                JobLog.status == RunStatus.PENDING.value,
            ]
            if claim is not None:
                mine.append(JobLog.claim == claim)
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(JobLog.id, JobLog.due_at).where(*mine).order_by(JobLog.id)
                ).all()
                found = ((self._load_dispatch(conn, r.id), r.due_at) for r in rows)
                return [(job, due) for job, due in found if job is not None]

        found = await asyncio.to_thread(pending)
        now = utcnow()
        due_now = [job for job, due in found if due is None or due <= now]
        waiting = [(job, due) for job, due in found if due is not None and due > now]
        if due_now:
            log.info(
                "manager %s: re-dispatching %d claimed runs left pending",
                self.manager_id,
                len(due_now),
            )
            await self.redispatch(due_now)
        for job, due in waiting:
            self._schedule_retry(job, (due - now).total_seconds())
        return len(found)

    # -- broadcast shards -----------------------------------------------------------------

    async def claim_shards(self, job: JobDispatch, total: int) -> list[JobDispatch]:
        """Turn a claimed slot into `total` shard runs (shard 0 is the claim row itself)."""

        def claim() -> list[JobDispatch]:
            transaction(
                self.engine,
                lambda conn: conn.execute(
                    update(JobLog).where(JobLog.id == job.job_log_id).values(shard_total=total)
                ),
                f"manager {self.manager_id}: run {job.job_log_id}: {total} shards",
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
        unstarted: bool = False,
        result: str = "",
    ) -> bool:
        final = _Final(
            job_id,
            status,
            message,
            node,
            exit_code,
            started_at,
            ended_at,
            output,
            unstarted,
            result,
        )
        changed, retry, delay, children = await self._final_writes.submit(final)
        if retry is not None:
            self._schedule_retry(retry, delay)
        if children:  # claimed with the parent's end: pending rows of this manager's
            task = asyncio.ensure_future(self.redispatch(children))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return changed

    def _write_finals(self, finals: Sequence[_Final]) -> list[_Answer]:
        answers = transaction(
            self.engine,
            lambda conn: self._write_finals_in(conn, finals),
            f"manager {self.manager_id}: recording {len(finals)} run end(s)",
        )
        stored = [f.job_id for f, a in zip(finals, answers, strict=True) if a[0]]
        metrics.runs_finished(self.engine, stored)  # read and counted by the metrics thread
        if self.on_stored is not None and stored:
            self.on_stored(stored)
        return answers

    def _write_finals_in(self, conn: Connection, finals: Sequence[_Final]) -> list[_Answer]:
        """The finals' statuses, their retries, and (in the same transaction) the fires of
        the children of the slots that ended for good (`ays_runtime.dependencies`); each
        child's dispatch is handed back with the answer of the run that ended its slot.

        The statuses cost the same few statements whatever the batch's size: one locking
        read of its runs still unfinished, each final's guard decided on them in order (of
        two finals of one run, the first ends it), one UPDATE of many rows per set of columns
        written. The retries (rare) cost a read and a claim each."""
        take_write_lock(conn)
        runs = _unfinished_runs(conn, {f.job_id for f in finals})
        now = utcnow()
        writes: dict[int, dict[str, Any]] = {}  # run id -> the columns its UPDATE sets
        changed: list[bool] = []
        for final in finals:
            run = runs.get(final.job_id)
            if run is None or not _may_end(run, final):
                changed.append(False)
                continue
            writes[final.job_id] = writes.get(final.job_id, {}) | _final_values(final, now)
            runs[final.job_id] = replace(run, status=final.status, node=final.node or run.node)
            changed.append(True)
        _update_runs(conn, writes)
        answers: list[_Answer] = []
        ended: dict[tuple[int, datetime], int] = {}  # parent slot -> index of its answer
        for final, stored in zip(finals, changed, strict=True):
            retry: JobDispatch | None = None
            delay = 0.0
            if stored and final.status in RETRYABLE:
                retry, delay = self._claim_retry(conn, final)
            answers.append((stored, retry, delay, []))
            if stored and retry is None:
                slot = (runs[final.job_id].task_id, runs[final.job_id].scheduled_at)
                ended.setdefault(slot, len(answers) - 1)
        if ended:
            children = fire_children(conn, self.manager_id, ended, utcnow())
            if children:
                first = min(ended.values())
                answers[first] = (*answers[first][:3], children)
        return answers

    def _claim_retry(self, conn: Connection, final: _Final) -> tuple[JobDispatch | None, float]:
        """The next attempt's row, pending and due after the backoff, if the policy wants one
        (a lost run's: held, see the module docstring). None also when another manager wrote
        it already (the slot key)."""
        row = conn.execute(
            select(
                JobLog.task_id,
                JobLog.scheduled_at,
                JobLog.params,
                JobLog.attempt,
                JobLog.shard_index,
                JobLog.shard_total,
                Task.retry_count,
                Task.retry_backoff,
                Task.retry_interval_s,
                Task.enabled,
                Task.timeout_s,
                Task.allow_concurrent_retry,
                JobLog.started_at,
            )
            .join(Task, Task.id == JobLog.task_id)
            .where(JobLog.id == final.job_id)
        ).first()
        if row is None or row.attempt >= row.retry_count or not row.enabled:
            return None, 0.0
        delay = retry_delay(row.retry_backoff, row.retry_interval_s, row.attempt)
        if final.status == RunStatus.NODE_LOST.value and not row.allow_concurrent_retry:
            hold = lost_run_hold(row.started_at, row.timeout_s)
            if hold > delay:
                log.warning(
                    "manager %s: run %d of task %d: its node %s was lost while it ran; the "
                    "retry waits until the node reports it ended, at most %.0fs",
                    self.manager_id,
                    final.job_id,
                    row.task_id,
                    final.node,
                    hold,
                )
                delay = hold
        fire = Fire(
            row.task_id,
            row.scheduled_at,
            TriggerKind.RETRY.value,
            row.params,
            row.attempt + 1,
            row.shard_index,
            row.shard_total,
            due_at=utcnow() + timedelta(seconds=delay),
        )
        claimed = claim_in(conn, self.manager_id, [fire], utcnow())
        return (claimed[0], delay) if claimed else (None, 0.0)

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
        dispatch = make_dispatch(
            task,
            job_id,
            r.scheduled_at,
            r.trigger,
            r.attempt,
            r.params,
            r.shard_index,
            r.shard_total,
        )
        return with_parent_results(conn, [dispatch])[0]

    def _schedule_retry(self, retry: JobDispatch, delay: float) -> None:
        log.info(
            "manager %s: run %d of task %d: attempt %d in %.1fs",
            self.manager_id,
            retry.job_log_id,
            retry.task_id,
            retry.attempt,
            delay,
        )
        loop = asyncio.get_running_loop()

        def due() -> None:
            self._retries.discard(handle)
            task = loop.create_task(self._retry(retry))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        handle = loop.call_later(max(delay, 0.0), due)
        self._retries.add(handle)

    async def _retry(self, retry: JobDispatch) -> None:
        """Dispatch a retry's row now that it is due, unless it was ended meanwhile (killed
        through the API) or its task was disabled (then it is skipped, with the reason)."""

        def still_wanted(conn: Connection) -> tuple[bool, list[JobDispatch]]:
            """Whether to send it; the children fired when its slot ended skipped instead."""
            row = conn.execute(
                select(JobLog.status, JobLog.manager_id, Task.enabled)
                .join(Task, Task.id == JobLog.task_id, isouter=True)
                .where(JobLog.id == retry.job_log_id)
            ).first()
            if row is None or row.status != RunStatus.PENDING.value:
                return False, []
            if row.manager_id != self.manager_id:  # adopted by a peer while we were away
                return False, []
            if not row.enabled:
                conn.execute(
                    update(JobLog)
                    .where(JobLog.id == retry.job_log_id, JobLog.status.in_(UNFINISHED))
                    .values(
                        status=RunStatus.SKIPPED.value,
                        message="not retried: the task was disabled or deleted",
                        ended_at=utcnow(),
                    )
                )
                # Its slot has ended (skipped): its children are decided with it.
                slot = [(retry.task_id, retry.scheduled_at)]
                return False, fire_children(conn, self.manager_id, slot, utcnow())
            return True, []

        what = f"manager {self.manager_id}: run {retry.job_log_id}: deciding its retry"
        wanted, children = await asyncio.to_thread(transaction, self.engine, still_wanted, what)
        if wanted:
            await self.redispatch([retry])
        elif children:
            await self.redispatch(children)

    async def stop(self) -> None:
        """Let go of the retries still waiting: their rows stay pending in the database, and
        the next start dispatches each when it is due."""
        for handle in self._retries:
            handle.cancel()
        if self._retries:
            log.info(
                "manager %s: %d retr%s waiting: kept in the database for the next start",
                self.manager_id,
                len(self._retries),
                "y" if len(self._retries) == 1 else "ies",
            )
        self._retries.clear()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)


@dataclass(frozen=True)
class _Run:
    """What a final's guard and its slot need of an unfinished run."""

    status: str
    node: str
    task_id: int
    scheduled_at: datetime


def _unfinished_runs(conn: Connection, ids: set[int]) -> dict[int, _Run]:
    """The runs of `ids` still unfinished, locked (MySQL) until the transaction ends: what the
    guards decide on stays true until the UPDATEs (SQLite: see `take_write_lock`)."""
    query = (
        select(JobLog.id, JobLog.status, JobLog.node, JobLog.task_id, JobLog.scheduled_at)
        .where(JobLog.id.in_(sorted(ids)), JobLog.status.in_(UNFINISHED))
        .with_for_update()
    )
    return {
        r.id: _Run(r.status, r.node or "", r.task_id, r.scheduled_at) for r in conn.execute(query)
    }


def _may_end(run: _Run, final: _Final) -> bool:
    """The guard of a final on a run as read, or as an earlier final of the batch left it:
    only an unfinished run ends; a dispatch failure (`unstarted`) ends no running run, and a
    node ends only a run it holds, or one no node has started."""
    if run.status != RunStatus.RUNNING.value:
        return run.status in UNFINISHED
    return not final.unstarted and (not final.node or run.node == final.node)


def _final_values(final: _Final, now: datetime) -> dict[str, Any]:
    """The columns a final writes (only those it knows: a report's node and start time)."""
    values: dict[str, Any] = {
        "status": final.status,
        "message": final.message[:1024],
        "ended_at": final.ended_at or now,
        "exit_code": final.exit_code,
        "output": final.output,
    }
    if final.result:
        values["result"] = final.result
    if final.node:
        values["node"] = final.node
    if final.started_at is not None:
        values["started_at"] = final.started_at
    return values


def _update_runs(conn: Connection, writes: dict[int, dict[str, Any]]) -> None:
    """Each run's columns: one UPDATE of many rows per set of columns (most batches: one).

    SQLite: an executemany, run in-process. MySQL: PyMySQL's executemany sends an UPDATE
    one row at a time (it joins only INSERT ... VALUES), a round trip each (200 rows: 35 ms
    on MariaDB here), so the rows go as one statement that joins a derived table of them,
    up to `_JOINED_CHARS` of text or `_JOINED_ROWS` rows per statement."""
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for job_id, values in writes.items():
        by_columns.setdefault(tuple(sorted(values)), []).append({"run_id": job_id, **values})
    for columns, rows in by_columns.items():  # SET: the columns named by the rows' keys
        if conn.dialect.name not in ("mysql", "mariadb") or len(rows) == 1:
            conn.execute(update(JobLog).where(JobLog.id == bindparam("run_id")), rows)
            continue
        for part in _parts(rows):
            _joined_update(conn, columns, part)


_JOINED_ROWS = 500
# Characters of text per statement: at most 2 MiB in UTF-8, under every max_allowed_packet
# default (MySQL 5.7: 4 MiB; MariaDB: 16 MiB). A single larger row goes alone, as before.
_JOINED_CHARS = 512 << 10


def _parts(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """`rows` in order, cut where a part would pass `_JOINED_ROWS` rows or `_JOINED_CHARS`
    of text."""
    parts: list[list[dict[str, Any]]] = [[]]
    size = 0
    for row in rows:
        row_size = sum(len(v) for v in row.values() if isinstance(v, str))
        if parts[-1] and (len(parts[-1]) >= _JOINED_ROWS or size + row_size > _JOINED_CHARS):
            parts.append([])
            size = 0
        parts[-1].append(row)
        size += row_size
    return parts


def _joined_update(conn: Connection, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    """UPDATE ays_job_log AS j JOIN (SELECT %s AS run_id, %s AS column ... UNION ALL SELECT
    %s, %s ...) AS v ON j.id = v.run_id SET j.column = v.column, ...: written as text, each
    value put through its column's bind processor (SQLAlchemy's own construction of 200 rows'
    literals took longer than the round trips it saves)."""
    dialect = conn.dialect
    quote = dialect.identifier_preparer.quote
    table = JobLog.__table__
    keys = ("run_id", *columns)  # each row's values, in this order; run_id is the column id
    processors = [
        table.c[n].type.dialect_impl(dialect).bind_processor(dialect) for n in ("id", *columns)
    ]
    first = ", ".join(f"%s AS {quote(key)}" for key in keys)
    rest = ", ".join("%s" for _ in keys)
    derived = " UNION ALL ".join([f"SELECT {first}"] + [f"SELECT {rest}"] * (len(rows) - 1))
    sets = ", ".join(f"j.{quote(c)} = v.{quote(c)}" for c in columns)
    sql = f"UPDATE {quote(JobLog.__tablename__)} AS j JOIN ({derived}) AS v"
    sql += f" ON j.id = v.run_id SET {sets}"
    params = [
        value if process is None else process(value)
        for row in rows
        for value, process in zip((row[key] for key in keys), processors, strict=True)
    ]
    conn.exec_driver_sql(sql, tuple(params))


def _with_shard(job: JobDispatch, index: int, total: int) -> JobDispatch:
    return replace(job, shard_index=index, shard_total=total)
