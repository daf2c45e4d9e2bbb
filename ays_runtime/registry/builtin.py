"""The built-in registry: nodes heartbeat to the manager over HTTP; missed beats = offline.

State lives in `ays_node`, so several managers sharing one database agree: a beat recorded by
any of them keeps the node online for all (a node beats to whichever manager answers). Each
manager refreshes its in-memory view every second and sweeps for silent nodes every heartbeat
interval; the sweep is one guarded UPDATE, so when two managers sweep at once only one of them
sees each node go offline (and handles its runs).

A node stopping cleanly beats with state `leaving` first: the manager that takes the beat
drops it from routing at once, the others at their next refresh; it still beats while it
finishes its runs (so it is not lost), and its last beat says `offline`. A node that falls
silent while leaving is swept like an online one.

At start a manager trusts only nodes whose last beat is recent (`_trusted_since`): an
`online` saved before an outage of the managers says nothing about the node now, so such a
node takes runs again once it beats, to this manager or another. Meanwhile, for at most one
heartbeat interval (and 2 s), a group that has such nodes and no trusted one is `settling`:
its runs wait for a beat instead of failing for want of a node.

A beat changes the in-memory view at once, and a refresh replaces it: a refresh whose read of
the table began before a beat's commit would undo that beat (a node just online missing from
routing until the next refresh, its runs failed for want of a node; a leaving node routed
again). So each beat's change is kept, stamped, until a refresh whose read began after it, and
a refresh lays the changes made since its read began over what it read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from ays_runtime.config import BuiltinRegistrySettings
from ays_runtime.protocol import Heartbeat
from ays_runtime.registry.base import NodeRef, NodeRegistry, ensure_node_groups
from ays_runtime.storage.database import transaction, utcnow
from ays_runtime.storage.models import Manager, Node, NodeSource, NodeStatus

log = logging.getLogger("ays.registry")

REFRESH_INTERVAL = 1.0
# A node whose last beat is older than this many heartbeat intervals (plus TRUST_SLACK) at
# the manager's start is not routed to until it beats again.
TRUST_SLACK = 1.0
# Nodes beat with state leaving, and this is how they are stored: the other node states.
_BEAT_STATUS = {
    "online": NodeStatus.ONLINE.value,
    "leaving": NodeStatus.LEAVING.value,
    "offline": NodeStatus.OFFLINE.value,
}
_BEATING = (NodeStatus.ONLINE.value, NodeStatus.LEAVING.value)
# Managers refresh their ays_manager row every manager.beat_interval (scheduler/ownership.py);
# one silent for longer than this, or stopped cleanly, is not offered to nodes as a place to
# beat and report to.
MANAGER_ALIVE_WITHIN = timedelta(seconds=20)


class BuiltinRegistry(NodeRegistry):
    def __init__(self, engine: Engine, settings: BuiltinRegistrySettings, manager_id: str) -> None:
        self.engine = engine
        self.settings = settings
        self.manager_id = manager_id
        self.offline_after = timedelta(
            seconds=settings.heartbeat_interval * settings.offline_after_missed
        )
        self._healthy: dict[str, list[NodeRef]] = {}  # replaced whole, never changed in place
        # Each node's last change by a beat: (time.monotonic(), the node, or None if dropped).
        self._changed: dict[str, tuple[float, NodeRef | None]] = {}
        self._lock = threading.Lock()  # beats come in the API's threads, refreshes in another
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        # Beats recorded before this are from before this manager started (see the module).
        self._trusted_since: datetime | None = None
        self._suspects: dict[str, int] = {}  # online nodes not trusted yet, per group
        self._settle_until = 0.0  # time.monotonic(): until then a group may be settling
        # The managers alive on this database (IP:PORT), told to nodes with each beat.
        self.live_managers: list[str] = [manager_id]

    def healthy_nodes(self, node_group: str) -> list[NodeRef]:
        return self._healthy.get(node_group, [])

    async def start(self) -> None:
        trust = timedelta(seconds=self.settings.heartbeat_interval + TRUST_SLACK)
        self._trusted_since = utcnow() - trust
        self._settle_until = time.monotonic() + self.settings.heartbeat_interval + 2 * TRUST_SLACK
        await asyncio.to_thread(self._refresh)
        self._task = asyncio.create_task(self._loop(), name="registry-builtin")

    def settling(self, node_group: str) -> bool:
        return (
            bool(self._suspects.get(node_group))
            and not self._healthy.get(node_group)
            and time.monotonic() < self._settle_until
        )

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, 5)

    # -- heartbeats (called by the API) ---------------------------------------------------

    def record_heartbeat(self, beat: Heartbeat) -> bool:
        """Upsert the node with the state its beat says (creating its node group if there
        is none); True when it came online (it was not online before)."""
        now = utcnow()
        status = _BEAT_STATUS[beat.state]
        values = {
            "node_group": beat.node_group,
            "status": status,
            "version": beat.version,
            "running_jobs": beat.running_jobs,
            "load_1m": beat.load_1m,
            "cpu_count": beat.cpu_count,
            "memory_percent": beat.memory_percent,
            "last_seen": now,
            "updated_at": now,
        }

        def record(conn: Connection) -> tuple[list[str], str | None]:
            created = ensure_node_groups(conn, {beat.node_group: f"{beat.ip}:{beat.port}"})
            row = conn.execute(
                select(Node.id, Node.status).where(Node.ip == beat.ip, Node.port == beat.port)
            ).first()
            if row is None:
                conn.execute(
                    insert(Node).values(
                        ip=beat.ip,
                        port=beat.port,
                        source=NodeSource.SELF.value,
                        created_at=now,
                        **values,
                    )
                )
                return created, None
            conn.execute(update(Node).where(Node.id == row.id).values(**values))
            return created, row.status

        what = f"manager {self.manager_id}: heartbeat of node {beat.ip}:{beat.port}"
        created, before = transaction(self.engine, record, what)
        for group in created:
            log.info(
                "manager %s: node group %s created: node %s:%d joined it",
                self.manager_id,
                group,
                beat.ip,
                beat.port,
            )
        ref = NodeRef(beat.ip, beat.port, beat.node_group, beat.running_jobs)
        if status != NodeStatus.ONLINE.value:
            self._drop_healthy(ref)
            if before != status:
                log.info(
                    "manager %s: node %s:%d (%s) %s",
                    self.manager_id,
                    beat.ip,
                    beat.port,
                    beat.node_group,
                    "is leaving: no new runs for it"
                    if status == NodeStatus.LEAVING.value
                    else "has left",
                )
            return False
        came_online = before != NodeStatus.ONLINE.value
        if came_online:
            log.info(
                "manager %s: node %s:%d (%s) is online",
                self.manager_id,
                beat.ip,
                beat.port,
                beat.node_group,
            )
        if came_online or all(n.address != ref.address for n in self.healthy_nodes(ref.node_group)):
            self._add_healthy(ref)  # also a node not trusted since this manager started
        return came_online

    def _add_healthy(self, ref: NodeRef) -> None:
        # Make a node usable at once instead of at the next refresh.
        self._change(ref.address, ref)

    def _drop_healthy(self, ref: NodeRef) -> None:
        # Stop routing to a leaving node at once instead of at the next refresh.
        self._change(ref.address, None)

    def _change(self, address: str, ref: NodeRef | None) -> None:
        with self._lock:
            self._changed[address] = (time.monotonic(), ref)
            self._healthy = _placed(self._healthy, address, ref)

    # -- sweeping and refreshing ----------------------------------------------------------

    def sweep(self) -> list[str]:
        """Mark online (or leaving) nodes silent for longer than the offline timeout as
        offline."""
        cutoff = utcnow() - self.offline_after

        def sweep(conn: Connection) -> list[str]:
            silent = conn.execute(
                select(Node.id, Node.ip, Node.port).where(
                    Node.status.in_(_BEATING), Node.last_seen < cutoff
                )
            ).all()
            lost: list[str] = []
            for node in silent:
                changed = conn.execute(
                    update(Node)
                    .where(
                        Node.id == node.id,
                        Node.status.in_(_BEATING),
                        Node.last_seen < cutoff,
                    )
                    .values(status=NodeStatus.OFFLINE.value, updated_at=utcnow())
                ).rowcount
                if changed:
                    lost.append(f"{node.ip}:{node.port}")
            return lost

        return transaction(self.engine, sweep, f"manager {self.manager_id}: sweeping nodes")

    def _refresh_managers(self) -> None:
        with self.engine.connect() as conn:
            alive = conn.execute(
                select(Manager.manager_id)
                .where(
                    Manager.last_seen >= utcnow() - MANAGER_ALIVE_WITHIN,
                    Manager.stopped_at.is_(None),
                )
                .order_by(Manager.manager_id)
            ).scalars()
            self.live_managers = sorted({self.manager_id, *alive})

    def _refresh(self) -> None:
        began = time.monotonic()
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Node.ip, Node.port, Node.node_group, Node.running_jobs, Node.last_seen)
                .where(Node.status == NodeStatus.ONLINE.value)
                .order_by(Node.ip, Node.port)
            ).all()
        healthy: dict[str, list[NodeRef]] = {}
        suspects: dict[str, int] = {}
        since = self._trusted_since
        for r in rows:
            if since is not None and (r.last_seen is None or r.last_seen < since):
                suspects[r.node_group] = suspects.get(r.node_group, 0) + 1
                continue
            healthy.setdefault(r.node_group, []).append(
                NodeRef(r.ip, r.port, r.node_group, r.running_jobs)
            )
        with self._lock:
            # A change stamped before the read began was committed before it, so the read
            # holds it; a later one may be missing from the read, and stands over it.
            self._changed = {a: c for a, c in self._changed.items() if c[0] >= began}
            for address, (_, ref) in self._changed.items():
                healthy = _placed(healthy, address, ref)
            self._healthy = healthy
            self._suspects = suspects

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        # Beats missed while this manager was down say nothing about the nodes: give them one
        # full offline window to reach it before the first sweep.
        next_sweep = loop.time() + self.offline_after.total_seconds()
        next_managers = loop.time()
        while not self._stopping.is_set():
            try:
                if loop.time() >= next_managers:
                    next_managers = loop.time() + self.settings.heartbeat_interval
                    await asyncio.to_thread(self._refresh_managers)
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + self.settings.heartbeat_interval
                    for address in await asyncio.to_thread(self.sweep):
                        log.warning(
                            "manager %s: node %s missed %d heartbeats: offline",
                            self.manager_id,
                            address,
                            self.settings.offline_after_missed,
                        )
                        if self.on_node_lost is not None:
                            await self.on_node_lost(address)
                await asyncio.to_thread(self._refresh)
                if self._failing:
                    log.warning("manager %s: registry: database is back", self.manager_id)
                    self._failing = False
            except SQLAlchemyError as err:
                if not self._failing:
                    log.error(
                        "manager %s: registry: database unreachable, keeping the last "
                        "known node states: %s",
                        self.manager_id,
                        getattr(err, "orig", None) or err,
                    )
                    self._failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), REFRESH_INTERVAL)


def _placed(
    healthy: dict[str, list[NodeRef]], address: str, ref: NodeRef | None
) -> dict[str, list[NodeRef]]:
    """A copy of `healthy` with the node at `address` in `ref`'s group only, or in none when
    `ref` is None."""
    placed = {
        group: kept
        for group, nodes in healthy.items()
        if (kept := [n for n in nodes if n.address != address])
    }
    if ref is not None:
        placed[ref.node_group] = sorted(
            [*placed.get(ref.node_group, []), ref], key=lambda n: (n.ip, n.port)
        )
    return placed
