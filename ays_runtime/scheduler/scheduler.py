"""The scheduler: reconciles the timer list, fires due timers, claims their slots.

Phases: `run()` beats once (when it shares the database: scheduler/ownership.py) and
reconciles, then runs its loops (fire, claim writer, reconcile tick, beat) until `stop()`;
stopping ends the fire loop first, then flushes the claim writer, so no slot is left
half-fired. Each beat that finds the live managers changed reconciles at once, so this
manager's timers follow its share.

The fire loop sleeps until the earliest timer is due (or until a reconcile changes the
list); it never polls. With `claim_ahead`, it fires each timer that much before its slot: the
slot's row is claimed and committed early (`due_at` = the slot) and the claim writer hands
the run over to dispatch when the slot comes (FireWriter, "held"). The commit is then off the
path from slot to dispatch, and a burst due in one second starts being written that much
before it. The run is the task as it was at the claim, unless the task is disabled or
deleted before the slot (`drop_unwanted`, checked half a second before it).

A second holding more slots than the writer claims in `claim_ahead` (a burst: 100,000 tasks
on `0 * * * * *`) is fired earlier still, by its slots' count over `claim_rate`, at most
BURST_AHEAD: the timer list counts its timers per second and names the crowded ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from ays_runtime.exceptions import NotFoundError
from ays_runtime.metrics import manager as metrics
from ays_runtime.scheduler.firing import Fire, FireWriter
from ays_runtime.scheduler.ledger import DEFAULT_HORIZON, owed_range
from ays_runtime.scheduler.ownership import Ownership
from ays_runtime.scheduler.reconcile import Plan, Reconciler, memory_snapshot
from ays_runtime.scheduler.timers import TimerList
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import MisfirePolicy, Task, TriggerKind
from ays_runtime.transport.base import JobDispatch
from ays_runtime.vocabulary import SlotMissReason

log = logging.getLogger("ays.scheduler")

_TINY = timedelta(microseconds=1)
FREEZE_AFTER = 10_000  # timers installed by one reconcile (start-up, mass changes)
# Timers fired per turn of the fire loop: between turns the claim writer starts on what is
# submitted, instead of waiting for a burst of 100k to be fired whole.
FIRE_CHUNK = 2_000
# The claim rate a burst is planned for (slots a second): what one claim writer keeps up on a
# loaded 2-core machine with MariaDB (about 12,000 measured, bench/scheduler_bench.py). A
# second holding more slots than this rate claims in `claim_ahead` starts that much earlier.
CLAIM_RATE = 10_000
BURST_AHEAD = timedelta(seconds=5)  # the earliest a burst starts: claim_ahead's own limit
_REST_OF_SECOND = timedelta(microseconds=999_999)


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        manager_id: str,
        on_claimed: Callable[[list[JobDispatch]], Awaitable[None]],
        reconcile_interval: float = 5.0,
        misfire_grace: float = 5.0,
        clock: Callable[[], datetime] = utcnow,
        ledger_horizon: float = DEFAULT_HORIZON.total_seconds(),
        ownership: Ownership | None = None,
        claim_ahead: float = 0.0,
        claim_rate: float = CLAIM_RATE,
    ) -> None:
        self.engine = engine
        self.manager_id = manager_id
        # How long before its slot a timer fires (its row claimed early, the run held).
        self.ahead = timedelta(seconds=claim_ahead)
        # Seconds with more slots than `claim_ahead` claims are crowded (claimed earlier).
        self.claim_rate = claim_rate
        crowd = int(claim_ahead * claim_rate) + 1 if claim_ahead > 0 else None
        self.timers = TimerList(crowd)
        self.horizon = timedelta(seconds=ledger_horizon)
        self.reconciler = Reconciler(engine, manager_id, misfire_grace, self.horizon)
        self.writer = FireWriter(engine, manager_id, on_claimed, clock=clock)
        self.reconcile_interval = reconcile_interval
        self.grace = timedelta(seconds=misfire_grace)
        self.clock = clock
        self._wakeup = asyncio.Event()
        self._reconcile_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()  # the first reconcile has installed the timers
        self._db_failing = False
        self.fired_total = 0
        # None: this manager holds every task (tests, tools); else its share of them.
        self.ownership = ownership
        self._beat_failing = False

    # -- reconciliation -------------------------------------------------------------------

    async def reconcile_now(self) -> Plan:
        """Reconcile at once (the API calls this after a change); one at a time."""
        async with self._reconcile_lock:
            began = time.perf_counter()
            share = self.ownership
            plan = await asyncio.to_thread(
                self.reconciler.plan,
                memory_snapshot(self.timers),
                self.clock(),
                None if share is None else share.owned,
                None if share is None else share.catch_up,
            )
            if plan.writes:
                await asyncio.to_thread(self.reconciler.apply, plan)
            Reconciler.apply_to_memory(plan, self.timers)
            self.writer.warm([timer.task_id for timer in plan.put_timers])
            metrics.reconciled(time.perf_counter() - began, plan.actions)
            if len(plan.put_timers) >= FREEZE_AFTER:
                # Move the (long-lived, acyclic) timers out of the cyclic GC's view, so later
                # full collections stop walking 100k of them on every tick (~25% of a no-change
                # reconcile at 100k). Refcounting still frees a timer once it is replaced.
                gc.freeze()
            for misfire in plan.misfires:
                self.writer.submit(
                    Fire(misfire.task_id, misfire.scheduled_at, TriggerKind.MISFIRE.value)
                )
            for late in plan.catch_up:
                self.writer.submit(Fire(late.task_id, late.scheduled_at))
            metrics.FIRES_SUBMITTED.inc(len(plan.misfires) + len(plan.catch_up))
            for owed in plan.missed:
                self.writer.note_missed(owed)
            for action in plan.actions:
                log.info("manager %s: reconcile: %s", self.manager_id, action)
            if plan:
                self._wakeup.set()
            return plan

    async def _reconcile_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.reconcile_interval)
                return
            try:
                await self.reconcile_now()
            except SQLAlchemyError as err:
                if not self._db_failing:
                    log.error(
                        "manager %s: reconcile failed, timers keep firing: %s",
                        self.manager_id,
                        getattr(err, "orig", None) or err,
                    )
                    self._db_failing = True
                continue
            if self._db_failing:
                log.warning("manager %s: database is back, reconcile resumed", self.manager_id)
                self._db_failing = False

    # -- ownership ------------------------------------------------------------------------

    async def beat(self) -> bool:
        """One liveness beat; True when the live managers changed. A failed beat keeps the
        last view (and the timers): the peers may fire this one's tasks too, never neither."""
        if self.ownership is None:
            return False
        try:
            changed = await asyncio.to_thread(self.ownership.beat)
        except SQLAlchemyError as err:
            if not self._beat_failing:
                log.error(
                    "manager %s: liveness beat failed, keeping this manager's share: %s",
                    self.manager_id,
                    getattr(err, "orig", None) or err,
                )
                self._beat_failing = True
            return False
        self._beat_failing = False
        return changed

    async def _beat_loop(self) -> None:
        if self.ownership is None:
            return
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.ownership.beat_interval)
                return
            if await self.beat():
                try:
                    await self.reconcile_now()
                except SQLAlchemyError as err:  # the reconcile tick tries again
                    log.error(
                        "manager %s: reconcile after a change of managers failed: %s",
                        self.manager_id,
                        getattr(err, "orig", None) or err,
                    )

    # -- firing ---------------------------------------------------------------------------

    def fire_due(
        self, now: datetime, limit: int | None = None, until: datetime | None = None
    ) -> int:
        """Submit every due timer's slot (or the first `limit`) and reschedule it; returns
        how many were submitted. Due: at or before `until` (default `fire_until(now)`)."""
        submitted = 0
        late: list[int] = []
        for timer in self.timers.pop_due(self.fire_until(now) if until is None else until, limit):
            if now - timer.fire_at <= self.grace:
                # Early (claim_ahead): the row says when the run may go (recovery, adoption).
                early = timer.fire_at if timer.fire_at > now else None
                self.writer.submit(Fire(timer.task_id, timer.fire_at, due_at=early))
                submitted += 1
                timer.fire_at = timer.schedule.next_after(timer.fire_at)
            else:
                # Later than the grace (a stalled host, a clock jump): the misfire policy decides.
                missed_from, next_at = timer.fire_at, timer.schedule.next_after(now)
                if timer.misfire_policy == MisfirePolicy.FIRE_ONCE_NOW.value:
                    slot = timer.schedule.last_at_or_before(now, timer.fire_at - _TINY)
                    if slot is not None:
                        self.writer.submit(Fire(timer.task_id, slot, TriggerKind.MISFIRE.value))
                        submitted += 1
                else:  # skip: the slots passed are the ledger's `skipped` range
                    owed = owed_range(
                        timer.task_id,
                        timer.schedule,
                        missed_from,
                        next_at,
                        SlotMissReason.SKIPPED,
                        now,
                        self.horizon,
                    )
                    if owed is not None:
                        self.writer.note_missed(owed)
                late.append(timer.task_id)
                timer.fire_at = next_at
            self.timers.put(timer)
        metrics.FIRES_SUBMITTED.inc(submitted)
        if late:
            metrics.FIRES_MISFIRED.inc(len(late))
            # One line per burst, not per timer: an overloaded manager must not log more.
            log.warning(
                "manager %s: %d timer(s) later than the %.0fs grace (tasks %s%s); their "
                "misfire policy applied",
                self.manager_id,
                len(late),
                self.grace.total_seconds(),
                ", ".join(map(str, late[:10])),
                ", ..." if len(late) > 10 else "",
            )
        self.fired_total += submitted
        return submitted

    def fire_until(self, now: datetime) -> datetime:
        """The timers due at or before this are fired at `now`: `claim_ahead` ahead of it,
        and every second up to a crowded one whose burst must start by now."""
        until = now + self.ahead
        for second in self.timers.crowded:
            if second > until and second - self._burst_ahead(second) <= now:
                until = second + _REST_OF_SECOND
        return until

    def _burst_ahead(self, second: datetime) -> timedelta:
        """How long before `second` its slots start being fired: `claim_ahead`, or the time
        the claim writer needs for them at `claim_rate`, at most BURST_AHEAD."""
        needed = timedelta(seconds=self.timers.count_at(second) / self.claim_rate)
        return max(self.ahead, min(needed, BURST_AHEAD))

    def _next_fire(self) -> datetime | None:
        """When the fire loop must fire next: `claim_ahead` before the earliest timer, or
        earlier for a crowded second."""
        deadline = self.timers.next_deadline()
        at = None if deadline is None else deadline - self.ahead
        for second in self.timers.crowded:
            start = second - self._burst_ahead(second)
            if at is None or start < at:
                at = start
        return at

    async def _fire_loop(self) -> None:
        while not self._stopping.is_set():
            self._wakeup.clear()
            now = self.clock()
            until = self.fire_until(now)
            self.fire_due(now, FIRE_CHUNK, until)
            # The rest of a burst, a chunk a turn, the claim writer starting between turns.
            # Judged against the grace as of `now`, as if fired at once: the chunking must
            # not make a slot late.
            while not self._stopping.is_set() and self._still_due(until):
                await asyncio.sleep(0)
                self.fire_due(now, FIRE_CHUNK, until)
            at = self._next_fire()
            delay = None if at is None else (at - self.clock()).total_seconds()
            if delay is not None and delay <= 0:
                await asyncio.sleep(0)  # let the writer and the API run between bursts
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), delay)

    def _still_due(self, until: datetime) -> bool:
        deadline = self.timers.next_deadline()
        return deadline is not None and deadline <= until

    async def trigger_now(self, task_id: int, params: str | None = None) -> int:
        """Fire `task_id` once now, outside its schedule; returns the new job-log id."""

        def exists() -> bool:
            with self.engine.connect() as conn:
                return conn.execute(select(Task.id).where(Task.id == task_id)).first() is not None

        if not await asyncio.to_thread(exists):
            raise NotFoundError(f"task {task_id} does not exist")
        job_id = await self.writer.submit_and_wait(
            Fire(task_id, self.clock(), TriggerKind.MANUAL.value, params)
        )
        if job_id is None:
            raise NotFoundError(f"task {task_id} was deleted before it could fire")
        return job_id

    # -- life cycle -----------------------------------------------------------------------

    async def run(self) -> None:
        writer = asyncio.create_task(self.writer.run(), name="claim-writer")
        try:
            await self.beat()  # the share first, so the first reconcile installs only it
            await self.reconcile_now()
            self.ready.set()
            await asyncio.gather(self._fire_loop(), self._reconcile_loop(), self._beat_loop())
        finally:
            self.writer.close()
            try:
                await asyncio.wait_for(writer, 10.0)
            except TimeoutError:
                log.error(
                    "manager %s: %d fires not claimed at stop (database away)",
                    self.manager_id,
                    self.writer.backlog,
                )

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()
