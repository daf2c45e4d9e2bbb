"""The built-in registry: nodes heartbeat to the manager over HTTP; missed beats = offline.

State lives in `ays_node`, so several managers sharing one database agree. Each manager
refreshes its in-memory view every second and sweeps for silent nodes every heartbeat
interval; the sweep is one guarded UPDATE, so when two managers sweep at once only one of them
sees each node go offline (and handles its runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from ays_runtime.config import BuiltinRegistrySettings
from ays_runtime.protocol import Heartbeat
from ays_runtime.registry.base import NodeRef, NodeRegistry, ensure_node_groups
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import Node, NodeSource, NodeStatus

log = logging.getLogger("ays.registry")

REFRESH_INTERVAL = 1.0


class BuiltinRegistry(NodeRegistry):
    def __init__(self, engine: Engine, settings: BuiltinRegistrySettings, manager_id: str) -> None:
        self.engine = engine
        self.settings = settings
        self.manager_id = manager_id
        self.offline_after = timedelta(
            seconds=settings.heartbeat_interval * settings.offline_after_missed
        )
        self._healthy: dict[str, list[NodeRef]] = {}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def healthy_nodes(self, node_group: str) -> list[NodeRef]:
        return self._healthy.get(node_group, [])

    async def start(self) -> None:
        await asyncio.to_thread(self._refresh)
        self._task = asyncio.create_task(self._loop(), name="registry-builtin")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, 5)

    # -- heartbeats (called by the API) ---------------------------------------------------

    def record_heartbeat(self, beat: Heartbeat) -> bool:
        """Upsert the node as online (creating its node group if there is none); True when
        it was not online before."""
        now = utcnow()
        values = {
            "node_group": beat.node_group,
            "status": NodeStatus.ONLINE.value,
            "version": beat.version,
            "running_jobs": beat.running_jobs,
            "last_seen": now,
            "updated_at": now,
        }
        with self.engine.begin() as conn:
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
                came_online = True
            else:
                conn.execute(update(Node).where(Node.id == row.id).values(**values))
                came_online = row.status != NodeStatus.ONLINE.value
        for group in created:
            log.info(
                "manager %s: node group %s created: node %s:%d joined it",
                self.manager_id,
                group,
                beat.ip,
                beat.port,
            )
        if came_online:
            log.info(
                "manager %s: node %s:%d (%s) is online",
                self.manager_id,
                beat.ip,
                beat.port,
                beat.node_group,
            )
            self._add_healthy(NodeRef(beat.ip, beat.port, beat.node_group, beat.running_jobs))
        return came_online

    def _add_healthy(self, ref: NodeRef) -> None:
        # Make a node usable at once instead of at the next refresh.
        nodes = [n for n in self._healthy.get(ref.node_group, []) if n.address != ref.address]
        nodes.append(ref)
        nodes.sort(key=lambda n: (n.ip, n.port))
        self._healthy[ref.node_group] = nodes

    # -- sweeping and refreshing ----------------------------------------------------------

    def sweep(self) -> list[str]:
        """Mark online nodes silent for longer than the offline timeout as offline."""
        cutoff = utcnow() - self.offline_after
        lost: list[str] = []
        with self.engine.begin() as conn:
            silent = conn.execute(
                select(Node.id, Node.ip, Node.port).where(
                    Node.status == NodeStatus.ONLINE.value, Node.last_seen < cutoff
                )
            ).all()
            for node in silent:
                changed = conn.execute(
                    update(Node)
                    .where(
                        Node.id == node.id,
                        Node.status == NodeStatus.ONLINE.value,
                        Node.last_seen < cutoff,
                    )
                    .values(status=NodeStatus.OFFLINE.value, updated_at=utcnow())
                ).rowcount
                if changed:
                    lost.append(f"{node.ip}:{node.port}")
        return lost

    def _refresh(self) -> None:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Node.ip, Node.port, Node.node_group, Node.running_jobs)
                .where(Node.status == NodeStatus.ONLINE.value)
                .order_by(Node.ip, Node.port)
            ).all()
        healthy: dict[str, list[NodeRef]] = {}
        for r in rows:
            healthy.setdefault(r.node_group, []).append(
                NodeRef(r.ip, r.port, r.node_group, r.running_jobs)
            )
        self._healthy = healthy

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        # Beats missed while this manager was down say nothing about the nodes: give them one
        # full offline window to reach it before the first sweep.
        next_sweep = loop.time() + self.offline_after.total_seconds()
        while not self._stopping.is_set():
            try:
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
