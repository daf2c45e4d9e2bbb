"""Claiming fired slots in the job log, in batches.

A fire is only real once its job-log row exists. Rows are inserted with "insert, or do nothing
if the slot key exists" (`uq_job_log_slot`), so when two managers, a restart or a retry fire
the same slot, exactly one insert wins and only the winner dispatches. Each batch carries a
random claim token and the winner learns its rows by selecting that token.

Batching is what makes thousands of fires per second possible. A batch is one transaction of
three statements, whatever its size: the tasks' versions and enabled flags, the multi-row
INSERT, the rows won. Both reads come back as one `group_concat` string, not a row per fire:
PyMySQL decodes rows in pure Python, and that decoding was most of a batch. (`INSERT ...
RETURNING`, which MariaDB >= 10.5 and SQLite >= 3.35 have, would still be a row per fire, and
MySQL, the production database, has none.) The tasks' dispatch fields are cached by version
(`TaskCache`), and the claim writer keeps two batches in flight on MySQL, so the event loop
never waits for one and the server writes one batch while Python builds the next.

A fire claimed ahead of its slot (the scheduler's `claim_ahead`; its row's `due_at` is the
slot) is held by the writer once committed and handed over when the slot comes: the claim's
cost is then paid before the slot, not between the slot and the dispatch.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, select
from sqlalchemy.exc import SQLAlchemyError

from ays_runtime.dependencies.results import with_parent_results
from ays_runtime.metrics import manager as metrics
from ays_runtime.scheduler.ledger import OwedRange, record_owed
from ays_runtime.storage.database import transaction, utcnow
from ays_runtime.storage.models import JobLog, RunStatus, Task, TriggerKind
from ays_runtime.transport.base import JobDispatch

log = logging.getLogger("ays.firing")

MAX_BATCH = 2000
# How long the first fire of a batch may wait for company. Small: lateness is measured from
# the slot time, and a lone fire should not wait at all when the writer is idle.
MAX_BATCH_DELAY = 0.002
# Claim batches in flight at once on MySQL (FireWriter.max_in_flight).
MAX_IN_FLIGHT = 2
# How long before its slot a run claimed ahead is checked against its task (disabled or
# deleted since?): the check reads the database, off the path from slot to dispatch.
CHECK_AHEAD = 0.5
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
    conn: Connection,
    manager_id: str,
    fires: Sequence[Fire],
    now: datetime,
    tasks: TaskCache | None = None,
) -> list[JobDispatch]:
    """`claim_slots` inside the caller's transaction. `tasks` keeps the tasks' dispatch
    fields between batches (the claim writer's); without it they are read for this call."""
    if not fires:
        return []
    cache = tasks if tasks is not None else TaskCache()
    current = cache.current(conn, {f.task_id for f in fires})
    token = uuid.uuid4().hex
    rows = ClaimRows(manager_id, token, now)
    for f in fires:
        task = current.get(f.task_id)
        if task is None:
            continue  # deleted between the timer firing and now
        if f.trigger != TriggerKind.MANUAL.value and not task.enabled:
            continue  # disabled after the timer fired: a disabled task runs only by hand
        rows.add(f, task.row["params"] if f.params is None else f.params)
    if not rows:
        return []
    rows.insert(conn)
    dispatches = [
        make_dispatch(
            current[f.task_id].row,
            job_id,
            f.scheduled_at,
            f.trigger,
            f.attempt,
            params,
            f.shard_index,
            f.shard_total,
        )
        for job_id, f, params in rows.won(conn)
    ]
    if not any(current[d.task_id].row.get("after") for d in dispatches):
        return dispatches  # the hot path: no task of the batch has parents
    return with_parent_results(conn, dispatches)


_TASK_COLUMNS = (
    Task.id,
    Task.version,
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
    Task.after,
)


def load_tasks(conn: Connection, task_ids: set[int]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    ids = list(task_ids)
    for start in range(0, len(ids), 5000):
        stmt = select(*_TASK_COLUMNS).where(Task.id.in_(ids[start : start + 5000]))
        for row in conn.execute(stmt).mappings():
            out[row["id"]] = dict(row)
    return out


# Task ids per query of the claim: the id list is rendered into the SQL (they are ints).
ID_CHUNK = 5000
# Rows per INSERT statement on MySQL: ~150 bytes each, far below max_allowed_packet.
INSERT_CHUNK = 5000
# Bytes of one GROUP_CONCAT answer on MySQL: a batch of 10,000 rows needs ~0.5 MB.
GROUP_CONCAT_MAX_LEN = 64 * 1024 * 1024


@dataclass(frozen=True)
class CurrentTask:
    enabled: bool
    row: dict[str, Any]  # the `_TASK_COLUMNS` of the task's current version


class TaskCache:
    """The dispatch fields of the tasks this writer fired, kept between claim batches.

    Each claim reads, in its own transaction, only each task's id, version and enabled flag,
    as one string (`group_concat`: one row instead of one per task, which is most of what a
    pure-Python driver spends on a read), and the full fields only of tasks whose version it
    has not seen. Every change of a task bumps its version (manager/tasks.py), so a cached
    row is the task as it is; the enabled flag is read fresh every time.
    """

    def __init__(self) -> None:
        self._rows: dict[int, dict[str, Any]] = {}
        self._shared: dict[Any, Any] = {}

    def _keep(self, rows: dict[int, dict[str, Any]], replace: bool) -> None:
        """Store `rows`, their few-valued strings shared (a row is ~1 KB; 100k are cached)."""
        shared = self._shared
        for task_id, row in rows.items():
            for column in _FEW_VALUES:
                value = row[column]
                row[column] = shared.setdefault(value, value)
            if replace:
                self._rows[task_id] = row
            else:
                self._rows.setdefault(task_id, row)

    def current(self, conn: Connection, task_ids: set[int]) -> dict[int, CurrentTask]:
        found: dict[int, tuple[int, bool]] = {}
        for id_text, version_text, enabled_text in task_fields(
            conn, task_ids, "id", "version", "enabled"
        ):
            found[int(id_text)] = (int(version_text), enabled_text == "1")
        for task_id in task_ids - found.keys():
            self._rows.pop(task_id, None)  # deleted
        stale = {
            task_id
            for task_id, (version, _) in found.items()
            if self._rows.get(task_id, _NO_ROW)["version"] != version
        }
        if stale:
            self._keep(load_tasks(conn, stale), replace=True)
        out: dict[int, CurrentTask] = {}
        for task_id, (_, enabled) in found.items():
            # `get`: another batch's thread may have found the task deleted meanwhile.
            row = self._rows.get(task_id)
            if row is not None:
                out[task_id] = CurrentTask(enabled, row)
        return out

    def warm(self, engine: Engine, task_ids: Sequence[int]) -> None:
        """Read the fields of `task_ids` ahead of their first fire (blocking: a worker
        thread), so that a burst right after start-up does not read them all at once."""
        ids = [i for i in task_ids if i not in self._rows]
        for start in range(0, len(ids), ID_CHUNK):
            with engine.connect() as conn:
                self._keep(load_tasks(conn, set(ids[start : start + ID_CHUNK])), replace=False)


_NO_ROW: dict[str, Any] = {"version": None}
_FEW_VALUES = ("node_group", "task_type", "route_strategy", "block_strategy", "retry_backoff")


def _concat(conn: Connection, *columns: str) -> str:
    """`group_concat` of `columns` joined by "|", rows by ",": values that hold neither."""
    if conn.dialect.name == "sqlite":
        return "group_concat(" + " || '|' || ".join(columns) + ")"
    # MySQL cuts a GROUP_CONCAT at group_concat_max_len bytes (1,024 by default), silently:
    # raised once per connection, whichever engine made it.
    info = conn.connection.info
    if not info.get("ays_group_concat"):
        conn.exec_driver_sql(f"SET SESSION group_concat_max_len = {GROUP_CONCAT_MAX_LEN}")
        info["ays_group_concat"] = True
    return "GROUP_CONCAT(CONCAT_WS('|', " + ", ".join(columns) + "))"


def task_fields(conn: Connection, task_ids: Iterable[int], *columns: str) -> Iterator[list[str]]:
    """`columns` of the tasks `task_ids` that exist, as text, one list per task: read as
    one `group_concat` string per ID_CHUNK tasks (the values must hold neither "|" nor ",")."""
    ids = sorted(task_ids)
    fields = _concat(conn, *columns)
    for start in range(0, len(ids), ID_CHUNK):
        listed = ",".join(str(int(i)) for i in ids[start : start + ID_CHUNK])
        text = conn.exec_driver_sql(
            f"SELECT {fields} FROM {Task.__tablename__} WHERE id IN ({listed})"
        ).scalar()
        for item in _items(text):
            yield item.split("|")


def _items(text: str | None) -> list[str]:
    return text.split(",") if text else []


def _stamp(when: datetime) -> str:
    """A naive datetime as both backends store it (SQLAlchemy's SQLite text, MySQL DATETIME(6))."""
    return when.isoformat(" ", "microseconds")


class ClaimRows:
    """One batch's job-log rows: inserted with "or do nothing" on the slot key, and read
    back by the batch's claim token.

    The rows are written as multi-row INSERTs whose constant part (token, manager, status,
    created_at, empty texts) is rendered once: on MySQL binding 15 values a row through
    PyMySQL's escaping was the largest cost of a batch. The rows won come back as one
    `group_concat` string keyed by (task, slot, attempt, shard), not one row each.
    """

    _COLUMNS = (
        "task_id",
        "scheduled_at",
        "trigger",
        "attempt",
        "shard_index",
        "shard_total",
        "params",
        "due_at",
        "claim",
        "manager_id",
        "node",
        "status",
        "created_at",
        "output",
        "message",
    )

    def __init__(self, manager_id: str, token: str, now: datetime) -> None:
        self.token = token
        self._tail = (token, manager_id, "", RunStatus.PENDING.value, _stamp(now), "", "")
        self._rows: list[tuple[Any, ...]] = []
        self._fires: dict[tuple[int, str, int, int], tuple[Fire, str]] = {}

    def __bool__(self) -> bool:
        return bool(self._rows)

    def add(self, fire: Fire, params: str) -> None:
        slot = _stamp(fire.scheduled_at)
        key = (fire.task_id, slot, fire.attempt, fire.shard_index)
        if key in self._fires:
            return  # the same slot twice in one batch: one row
        self._fires[key] = (fire, params)
        due = None if fire.due_at is None else _stamp(fire.due_at)
        self._rows.append(
            (
                int(fire.task_id),
                slot,
                fire.trigger,
                int(fire.attempt),
                int(fire.shard_index),
                int(fire.shard_total),
                params,
                due,
            )
        )

    def insert(self, conn: Connection) -> None:
        quote = conn.dialect.identifier_preparer.quote  # `trigger` is a reserved word
        table, columns = JobLog.__tablename__, ", ".join(quote(c) for c in self._COLUMNS)
        if conn.dialect.name == "sqlite":
            marks = ", ".join("?" * len(self._COLUMNS))
            conn.exec_driver_sql(
                f"INSERT INTO {table} ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING",
                [row + self._tail for row in self._rows],
            )
            return
        # MySQL: literal SQL with the driver's own escaping of each distinct value. It goes
        # through exec_driver_sql without parameters, where PyMySQL still applies
        # "%"-formatting: a "%" in a value is written "%%".
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        quoted: dict[Any, str] = {None: "NULL"}

        def lit(value: Any) -> str:
            text = quoted.get(value)
            if text is None:
                escaped = dbapi.escape(value)
                text = quoted[value] = escaped.replace("%", "%%")
            return text

        tail = ",".join(lit(v) for v in self._tail)
        for start in range(0, len(self._rows), INSERT_CHUNK):
            values = ",".join(
                f"({task_id},'{slot}',{lit(trigger)},{attempt},{index},{total},"
                f"{lit(params)},{lit(due)},{tail})"
                for task_id, slot, trigger, attempt, index, total, params, due in self._rows[
                    start : start + INSERT_CHUNK
                ]
            )
            conn.exec_driver_sql(
                f"INSERT INTO {table} ({columns}) VALUES {values} "
                "ON DUPLICATE KEY UPDATE claim = claim"
            )

    def won(self, conn: Connection) -> list[tuple[int, Fire, str]]:
        """(job-log id, fire, params) of each row this batch inserted."""
        fields = _concat(conn, "id", "task_id", "attempt", "shard_index", "scheduled_at")
        text = conn.exec_driver_sql(
            f"SELECT {fields} FROM {JobLog.__tablename__} WHERE claim = '{self.token}'"
        ).scalar()
        out = []
        for item in _items(text):
            job_id, task_id, attempt, index, slot = item.split("|")
            fire, params = self._fires[(int(task_id), slot, int(attempt), int(index))]
            out.append((int(job_id), fire, params))
        return out


def drop_unwanted(engine: Engine, manager_id: str, jobs: Sequence[JobDispatch]) -> set[int]:
    """The ids of `jobs` (claimed ahead, not sent yet) whose task is disabled or deleted now:
    not to be sent, as if never claimed (a disabled task runs only by hand). Their rows are
    deleted while still this manager's and pending."""

    def work(conn: Connection) -> set[int]:
        task_ids = {job.task_id for job in jobs}
        enabled = {
            int(id_text)
            for id_text, enabled_text in task_fields(conn, task_ids, "id", "enabled")
            if enabled_text == "1"
        }
        unwanted = [job.job_log_id for job in jobs if job.task_id not in enabled]
        if not unwanted:
            return set()
        mine = (
            JobLog.id.in_(unwanted),
            JobLog.manager_id == manager_id,
            JobLog.status == RunStatus.PENDING.value,
        )
        conn.execute(delete(JobLog).where(*mine))
        log.info(
            "manager %s: %d run(s) claimed ahead not sent: their task was disabled or deleted "
            "before the slot",
            manager_id,
            len(unwanted),
        )
        return set(unwanted)

    return transaction(
        engine, work, f"manager {manager_id}: checking {len(jobs)} run(s) claimed ahead"
    )


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
        max_in_flight: int | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.manager_id = manager_id
        self.on_claimed = on_claimed
        self.clock = clock
        # Runs claimed ahead, by slot, until the slot comes.
        self._held: dict[datetime, list[JobDispatch]] = {}
        self._releases: dict[datetime, asyncio.TimerHandle] = {}
        self._handing: set[asyncio.Task[None]] = set()
        self.max_batch = max_batch
        # Batches claimed at once, each in its own thread and transaction: while the server
        # writes one, Python builds the next. SQLite has one writer: a second batch would
        # only wait for the lock (or fail to upgrade its read and start again).
        if max_in_flight is None:
            max_in_flight = 1 if engine.dialect.name == "sqlite" else MAX_IN_FLIGHT
        self.max_in_flight = max_in_flight
        self._queue: list[Fire] = []
        self._owed: list[OwedRange] = []
        self._waiters: dict[tuple[int, datetime], asyncio.Future[int | None]] = {}
        self._wakeup = asyncio.Event()
        self._closing = False
        self._failing = False
        self.claimed_total = 0
        self._tasks = TaskCache()
        self._warming: set[asyncio.Task[None]] = set()

    def warm(self, task_ids: Sequence[int]) -> None:
        """Read the tasks of newly installed timers in the background (TaskCache.warm)."""
        if not task_ids:
            return

        async def read() -> None:
            try:
                await asyncio.to_thread(self._tasks.warm, self.engine, list(task_ids))
            except SQLAlchemyError as err:  # only a head start: the claim reads them anyway
                log.warning("manager %s: cannot read tasks ahead: %s", self.manager_id, err)

        task = asyncio.get_running_loop().create_task(read(), name="warm-tasks")
        self._warming.add(task)
        task.add_done_callback(self._warming.discard)

    @property
    def warming(self) -> bool:
        """Whether tasks of newly installed timers are still being read ahead."""
        return bool(self._warming)

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
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while True:
                if not self._queue and not self._owed:
                    if self._closing and not in_flight:
                        if self._held or self._handing:
                            # A clean stop sends what it claimed ahead when its slot comes:
                            # no row is left for a peer's adoption.
                            await self._release_held()
                            continue
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if len(self._queue) < self.max_batch and not self._closing:
                    await asyncio.sleep(MAX_BATCH_DELAY)
                if len(in_flight) >= self.max_in_flight:
                    # Fires keep queueing meanwhile: the next batch is the fuller for it.
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                owed = self._owed[:MAX_OWED_BATCH]
                del self._owed[:MAX_OWED_BATCH]
                task = asyncio.create_task(self._claim(batch, owed), name="claim-batch")
                in_flight.add(task)
                task.add_done_callback(self._finished)
                task.add_done_callback(in_flight.discard)
        finally:
            for task in in_flight:
                task.cancel()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._wakeup.set()  # `run` may be waiting for the last batch to finish
        if not task.cancelled() and task.exception() is not None:
            what = "claim batch" if task.get_name() == "claim-batch" else "hand-over of held runs"
            log.error("manager %s: %s failed", self.manager_id, what, exc_info=task.exception())

    def _write(
        self, batch: list[Fire], owed: list[OwedRange]
    ) -> tuple[list[JobDispatch], Counter[str]]:
        """The batch's claims and ledger ranges, in one transaction (worker thread)."""
        now = utcnow()

        def work(conn: Connection) -> tuple[list[JobDispatch], Counter[str]]:
            dispatches = claim_in(conn, self.manager_id, batch, now, self._tasks) if batch else []
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
        won = {(d.task_id, d.scheduled_at): d.job_log_id for d in dispatches}
        for fire in batch:
            future = self._waiters.pop((fire.task_id, fire.scheduled_at), None)
            if future is not None and not future.done():
                future.set_result(won.get((fire.task_id, fire.scheduled_at)))
        early = {(f.task_id, f.scheduled_at) for f in batch if f.due_at is not None}
        now = self.clock()
        go = []
        for job in dispatches:
            if (job.task_id, job.scheduled_at) in early and job.scheduled_at > now:
                self._hold(job, now)
            else:
                go.append(job)
        metrics.slots_not_fired(recorded)
        await self._hand_over(go)

    async def _hand_over(self, dispatches: list[JobDispatch]) -> None:
        claimed_at = utcnow()
        if dispatches:
            await self.on_claimed(dispatches)
        # After the hand-over: the metrics are bookkeeping, not on the path of a fire.
        metrics.fires_claimed(dispatches, claimed_at)

    def _hold(self, job: JobDispatch, now: datetime) -> None:
        slot = job.scheduled_at
        self._held.setdefault(slot, []).append(job)
        if slot not in self._releases:
            delay = max(0.0, (slot - now).total_seconds() - CHECK_AHEAD)
            self._releases[slot] = asyncio.get_running_loop().call_later(delay, self._release, slot)

    def _release(self, slot: datetime) -> None:
        """Shortly before the slot: drop the runs of tasks disabled or deleted since their
        claim, then send the rest when the slot comes (a task of their own, tracked)."""
        self._releases.pop(slot, None)
        jobs = self._held.pop(slot, [])

        async def send() -> None:
            try:
                dropped = await asyncio.to_thread(drop_unwanted, self.engine, self.manager_id, jobs)
            except SQLAlchemyError as err:
                # The rows are committed and this manager's: sending them is the safe side.
                log.error(
                    "manager %s: cannot check %d run(s) claimed ahead, sending them: %s",
                    self.manager_id,
                    len(jobs),
                    getattr(err, "orig", None) or err,
                )
                dropped = set()
            delay = (slot - self.clock()).total_seconds()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._hand_over([job for job in jobs if job.job_log_id not in dropped])

        task = asyncio.get_running_loop().create_task(send(), name="release-held")
        self._handing.add(task)
        task.add_done_callback(self._handing.discard)
        task.add_done_callback(self._finished)

    async def _release_held(self) -> None:
        """Send every held run when its slot comes (a clean stop)."""
        while self._held or self._handing:
            if self._handing:
                await asyncio.wait(set(self._handing))
                continue
            slot = min(self._held)
            self._releases.pop(slot).cancel()
            self._release(slot)

    def close(self) -> None:
        """Make `run` return once everything submitted is claimed (the caller bounds the wait)."""
        self._closing = True
        self._wakeup.set()
