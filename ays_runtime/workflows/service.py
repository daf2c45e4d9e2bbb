"""The manager's side of workflows: starts (by hand, by schedule), reruns, and the sweep.

`WorkflowService.run` ticks every SWEEP_INTERVAL seconds: it starts the schedules' slots that
came due since the last tick, fires the first tasks a run still lacks, writes the status of
the runs that settled and ends those that timed out (their unfinished runs killed through
the manager's kill path). First tasks are fired through `submit` (the scheduler's claim
writer), so they are claimed and dispatched as any fire.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import SQLAlchemyError

from ays_runtime.exceptions import AysError, NotFoundError, ScheduleError
from ays_runtime.scheduler.firing import Fire
from ays_runtime.scheduler.schedule import parse_schedule
from ays_runtime.storage.database import transaction, utcnow
from ays_runtime.storage.models import Workflow
from ays_runtime.vocabulary import TriggerKind
from ays_runtime.workflows import store

log = logging.getLogger("ays.workflows")

SWEEP_INTERVAL = 1.0


class WorkflowService:
    def __init__(
        self,
        engine: Engine,
        manager_id: str,
        submit: Callable[[Fire], None],
        kill_run: Callable[[int, str], Awaitable[object]],
    ) -> None:
        self.engine = engine
        self.manager_id = manager_id
        self.submit = submit
        self.kill_run = kill_run
        self._last_tick: datetime | None = None
        self._stopping = asyncio.Event()

    async def start(self, name: str, params: str | None) -> int:
        """Start workflow `name` now, by hand; the run's id."""

        def work(conn: Connection) -> tuple[int | None, list[Fire]]:
            wf = conn.execute(select(Workflow).where(Workflow.name == name)).first()
            if wf is None:
                raise NotFoundError(f"workflow {name!r} does not exist")
            return store.start_run(
                conn, wf, utcnow(), TriggerKind.MANUAL.value, params, self.manager_id
            )

        run_id, fires = await asyncio.to_thread(
            transaction, self.engine, work, f"manager {self.manager_id}: starting {name}"
        )
        if run_id is None:  # the same microsecond as another start: once is enough
            raise AysError(f"workflow {name!r} was started at this very moment; try again")
        for fire in fires:
            self.submit(fire)
        log.info("manager %s: workflow %s: run %d started", self.manager_id, name, run_id)
        return run_id

    async def rerun(self, run_id: int) -> None:
        fires = await asyncio.to_thread(
            transaction,
            self.engine,
            lambda conn: store.rerun_fires(conn, run_id),
            f"manager {self.manager_id}: rerunning workflow run {run_id}",
        )
        for fire in fires:
            self.submit(fire)
        log.info(
            "manager %s: workflow run %d: rerun from %d failed task(s)",
            self.manager_id,
            run_id,
            len(fires),
        )

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.tick()
            except SQLAlchemyError as err:
                log.warning("manager %s: workflow sweep: %s", self.manager_id, err)
            try:
                await asyncio.wait_for(self._stopping.wait(), SWEEP_INTERVAL)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stopping.set()

    async def tick(self) -> None:
        now = utcnow()
        since, self._last_tick = self._last_tick, now
        fires, kills = await asyncio.to_thread(self._sweep, since, now)
        for fire in fires:
            self.submit(fire)
        for job_id, reason in kills:
            await self.kill_run(job_id, reason)

    def _sweep(
        self, since: datetime | None, now: datetime
    ) -> tuple[list[Fire], list[tuple[int, str]]]:
        fires: list[Fire] = []
        kills: list[tuple[int, str]] = []
        if since is not None:
            fires += self._due_starts(since, now)
        with self.engine.connect() as conn:
            running = store.running_runs(conn)
        for run_id in running:

            def settle(conn: Connection, run_id: int = run_id) -> tuple[list[Fire], str, list[int]]:
                missing = store.missing_roots(conn, run_id)
                status, to_kill = store.settle(conn, run_id, now)
                return missing, status, to_kill

            missing, status, to_kill = transaction(
                self.engine, settle, f"manager {self.manager_id}: workflow run {run_id}"
            )
            fires += missing
            if to_kill:
                log.warning(
                    "manager %s: workflow run %d timed out: killing %d run(s)",
                    self.manager_id,
                    run_id,
                    len(to_kill),
                )
            kills += [(job, f"workflow run {run_id} timed out") for job in to_kill]
        return fires, kills

    def _due_starts(self, since: datetime, now: datetime) -> list[Fire]:
        with self.engine.connect() as conn:
            scheduled = conn.execute(
                select(Workflow).where(Workflow.enabled.is_(True), Workflow.schedule != "")
            ).all()
        fires: list[Fire] = []
        for wf in scheduled:
            try:
                slots = parse_schedule(wf.schedule, wf.timezone).slots_between(since, now, 100)
            except ScheduleError:
                continue
            for at in slots:  # [since, now): each tick takes on where the last one stopped

                def start(conn: Connection, wf: object = wf, at: datetime = at) -> list[Fire]:
                    run_id, roots = store.start_run(
                        conn, wf, at, TriggerKind.CRON.value, None, self.manager_id
                    )
                    return roots

                fires += transaction(
                    self.engine, start, f"manager {self.manager_id}: starting {wf.name}"
                )
        return fires
