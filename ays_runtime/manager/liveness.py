"""Managers sharing a database keep a row each in `ays_manager`, refreshed every few seconds
while they run. A manager silent for longer than `manager.adopt_after` (its host died, or it
was stopped and not started again) may have left pending runs behind: slots it claimed but
never sent, retries waiting their backoff. A live manager adopts them (one guarded UPDATE, so
two adopters never take the same row) and sends each when it is due: no run stays pending
for ever because the manager that claimed it is gone.

A manager that stopped cleanly (`stopped_at`, scheduler/ownership.py) is adopted from at
once. The runs a silent manager claimed ahead of their slots (`manager.claim_ahead`: attempt
0 with a `due_at`) are adopted sooner, once it is silent for `manager.silent_after`, when its
tasks move: they count as fired, so the new owner does not fire those slots again, and
waiting `adopt_after` would run them a minute late. Were the silent manager only stalled, it
may send them too when it wakes: the nodes' start claim lets one run start. With several
live managers, each adopts only the runs of the tasks it owns (its buckets), so the runs
follow the tasks.

Only managers with a row are ever adopted from; a manager of an older version, which writes
none, is left alone.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from ays_runtime.storage.database import transaction, utcnow
from ays_runtime.storage.models import JobLog, Manager, RunStatus

log = logging.getLogger("ays.liveness")


def record_alive(engine: Engine, manager_id: str, version: str, started_at: datetime) -> None:
    """Refresh this manager's row (create it on the first call)."""
    now = utcnow()
    refresh = (
        update(Manager)
        .where(Manager.manager_id == manager_id)
        .values(last_seen=now, version=version, started_at=started_at, stopped_at=None)
    )
    what = f"manager {manager_id}: recording it is alive"
    if transaction(engine, lambda conn: conn.execute(refresh).rowcount, what):
        return
    create = insert(Manager).values(
        manager_id=manager_id, version=version, started_at=started_at, last_seen=now
    )
    try:
        transaction(engine, lambda conn: conn.execute(create), what)
    except IntegrityError:  # two processes of one manager (a reload): the other made it
        pass


def adopt_from_silent(
    engine: Engine,
    manager_id: str,
    silent_for: timedelta,
    buckets: Collection[int] | None = None,
    bucket_count: int = 1,
    claimed_ahead: bool = False,
) -> str | None:
    """Take over the pending runs of managers silent for longer than `silent_for` or stopped
    cleanly; only those of tasks in `buckets` (task_id % bucket_count) when given, only the
    runs claimed ahead of their slots with `claimed_ahead`. The claim token the adopted rows
    now carry (select them by it), or None when there were none."""
    token = uuid.uuid4().hex  # one for every try: rows a try whose commit was lost took count

    def adopt(conn: Connection) -> tuple[list[str], int]:
        silent = list(
            conn.execute(
                select(Manager.manager_id).where(
                    or_(
                        Manager.last_seen < utcnow() - silent_for,
                        Manager.stopped_at.is_not(None),
                    ),
                    Manager.manager_id != manager_id,
                )
            ).scalars()
        )
        if not silent:
            return [], 0
        stmt = update(JobLog).where(
            JobLog.status == RunStatus.PENDING.value, JobLog.manager_id.in_(silent)
        )
        if buckets is not None:
            stmt = stmt.where((JobLog.task_id % bucket_count).in_(sorted(buckets)))
        if claimed_ahead:  # not retries (attempt > 0), not runs claimed at their slot
            stmt = stmt.where(JobLog.attempt == 0, JobLog.due_at.is_not(None))
        conn.execute(stmt.values(manager_id=manager_id, claim=token))
        mine = select(func.count()).where(
            JobLog.claim == token, JobLog.status == RunStatus.PENDING.value
        )
        return silent, conn.execute(mine).scalar_one()

    silent, adopted = transaction(
        engine, adopt, f"manager {manager_id}: adopting the runs of silent managers"
    )
    if not adopted:
        return None
    log.warning(
        "manager %s: adopted %d pending run(s) of silent manager(s) %s",
        manager_id,
        adopted,
        ", ".join(silent),
    )
    return token
