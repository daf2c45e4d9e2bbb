"""Partitioned ownership: the live managers sharing a database divide the tasks among them.

Contract
--------
* **Who is live.** A manager beats every `manager.beat_interval` seconds: it refreshes its
  `ays_manager` row (`last_seen`, `stopped_at` cleared) and, in the same beat, reads the rows
  of the others. Live = its own id, plus every row not marked stopped and seen within
  `manager.silent_after`. A clean stop marks the row (`stopped_at`); a reload's old process
  does not (its successor carries the same id on).
* **Who owns a task.** Task ids fall into `BUCKETS` buckets (`task_id % BUCKETS`, which the
  database computes too, so the reconcile reads only its share); each bucket goes to the live
  manager with the highest rendezvous score `blake2b(manager_id / bucket)`. Every manager with
  the same live list computes the same owners; a manager joining or leaving moves only the
  buckets it wins or held (about 1/n of them), never the others'.
* **What a manager does with it.** It holds timers only for the enabled tasks of its buckets
  (scheduler/reconcile.py); a changed live list reconciles at once. Adoption of a gone
  manager's pending runs (manager/liveness.py) takes only the runs of its own buckets.
* **Handover.** Managers learn of a change at their own next beat, so for a moment two may
  hold a task (the job-log slot key keeps each slot single) or none may. None never loses a
  slot: a manager gaining a task looks back to the last slot fired for it, at most
  `catch_up` (silent_after + beat_interval + misfire_grace), and fires every slot since, late;
  older slots get the task's misfire policy (fire_once_now fires the latest once, skip
  records them in the slot ledger). A manager that has never seen a peer keeps the single-
  manager rules (misfire_grace alone).
* **Bounds.** A cleanly stopped manager's tasks fire again within beat_interval + one
  reconcile; a silent one's (kill -9, host lost) within silent_after + beat_interval + one
  reconcile after its last beat: 8 s plus the reconcile with the defaults (2 s, 6 s). A
  joining manager takes its share at its first reconcile; the others drop it at their next
  beat (beat_interval). Clocks are assumed synchronised (NTP) to well under silent_after.
* **The database away.** A beat that fails keeps the last live list: the manager keeps
  firing its share; the others may count it gone and fire its tasks too (the slot key keeps
  each slot single). Never neither.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine, select, update

from ays_runtime.manager.liveness import record_alive
from ays_runtime.storage.database import transaction, utcnow
from ays_runtime.storage.models import Manager

log = logging.getLogger("ays.ownership")

# Enough buckets that 10 managers get shares within a few % of each other, few enough that a
# manager's bucket list is a short IN (...) in the reconcile's query.
BUCKETS = 1024
ALL_BUCKETS = frozenset(range(BUCKETS))


def bucket_of(task_id: int) -> int:
    return task_id % BUCKETS


def _score(manager_id: str, bucket: int) -> bytes:
    return hashlib.blake2b(f"{manager_id}/{bucket}".encode(), digest_size=8).digest()


def owner_of_bucket(bucket: int, live: Sequence[str]) -> str:
    """The live manager that owns `bucket` (rendezvous: highest score, ties by id)."""
    return max(live, key=lambda m: (_score(m, bucket), m))


def owner_of(task_id: int, live: Sequence[str]) -> str:
    return owner_of_bucket(bucket_of(task_id), live)


def buckets_of(manager_id: str, live: Sequence[str]) -> frozenset[int]:
    """The buckets `manager_id` owns when `live` are the live managers."""
    if len(live) <= 1:
        return ALL_BUCKETS
    return frozenset(b for b in range(BUCKETS) if owner_of_bucket(b, live) == manager_id)


def live_managers(engine: Engine, silent_after: timedelta, now: datetime) -> list[str]:
    """The ids of the managers not stopped and seen within `silent_after`, sorted."""
    with engine.connect() as conn:
        return sorted(
            conn.execute(
                select(Manager.manager_id).where(
                    Manager.stopped_at.is_(None), Manager.last_seen >= now - silent_after
                )
            ).scalars()
        )


def mark_stopped(engine: Engine, manager_id: str) -> None:
    """A clean stop: the peers take this manager's share at their next beat."""
    stopped = update(Manager).where(Manager.manager_id == manager_id).values(stopped_at=utcnow())
    transaction(engine, lambda conn: conn.execute(stopped), f"manager {manager_id}: stopping")


@dataclass
class Ownership:
    """This manager's view of who is live and which buckets are its own."""

    engine: Engine
    manager_id: str
    version: str
    beat_interval: float = 2.0
    silent_after: float = 6.0
    misfire_grace: float = 5.0
    live: tuple[str, ...] = ()
    buckets: frozenset[int] = ALL_BUCKETS
    peers_seen: bool = False  # some other manager was live at some beat of this process
    started_at: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        self.live = (self.manager_id,)

    @property
    def catch_up(self) -> timedelta:
        """How far back a manager gaining a task fires the slots nobody fired."""
        if not self.peers_seen:
            return timedelta(seconds=self.misfire_grace)
        return timedelta(seconds=self.silent_after + self.beat_interval + self.misfire_grace)

    @property
    def owned(self) -> frozenset[int] | None:
        """The buckets this manager owns; None when it owns them all (alone)."""
        return None if self.buckets == ALL_BUCKETS else self.buckets

    def owns(self, task_id: int) -> bool:
        return bucket_of(task_id) in self.buckets

    def beat(self) -> bool:
        """Refresh this manager's row and read the live ones (worker thread); True when the
        live list changed (the caller reconciles)."""
        record_alive(self.engine, self.manager_id, self.version, self.started_at)
        live = live_managers(self.engine, timedelta(seconds=self.silent_after), utcnow())
        if self.manager_id not in live:  # this one beats, whatever its row said a moment ago
            live = sorted([*live, self.manager_id])
        return self.set_live(live)

    def set_live(self, live: Sequence[str]) -> bool:
        new = tuple(sorted(live))
        if new == self.live:
            return False
        before = self.live
        self.live = new
        self.peers_seen = self.peers_seen or len(new) > 1
        self.buckets = buckets_of(self.manager_id, new)
        joined = sorted(set(new) - set(before))
        left = sorted(set(before) - set(new))
        log.warning(
            "manager %s: live managers now %s (%s%s); this one owns %d of %d buckets",
            self.manager_id,
            ", ".join(new),
            f"joined {', '.join(joined)}" if joined else "",
            f"{'; ' if joined else ''}gone {', '.join(left)}" if left else "",
            len(self.buckets),
            BUCKETS,
        )
        return True

    def leave(self) -> None:
        mark_stopped(self.engine, self.manager_id)
