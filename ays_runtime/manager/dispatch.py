"""Dispatch: from a fired run to a run recorded as handed over (or failed), on any transport.

The `Dispatcher` is the only place that decides where a run goes and what its row says about
it; the transport (ays_runtime/transport/) only hands runs over and answers what became of
each (`Handover`). For every batch of runs it is given (fresh fires, retries that are due,
runs left pending by an earlier process), on the manager's event loop:

1. A run whose group the registry does not trust yet (this manager has just started) waits,
   in the background, for a beat from that group; its row stays pending meanwhile (a stop
   leaves it to the next start, `RunTracker.recover_pending`).
2. A run whose group has no healthy node fails at once ("no healthy node in group g"), and
   the retry policy takes over.
3. The first send of a broadcast claims one shard per healthy node (`claim_shards`: shard i
   of N, a job-log row each) and hands each shard to its node.
4. Otherwise the run goes where the transport delivers: the group's queue when the transport
   lets the group's nodes take runs (`routes_to_nodes` False: RocketMQ), else the node the
   task's route strategy picks (`Router`). The runs of a burst bound for one destination go
   in one `hand_over`. A `failover` run is handed to node after node until one takes it.
5. Each outcome is recorded by `RunTracker`: DELIVERED -> `dispatched` (with the node, if
   known); REFUSED or NOT_REACHED -> `failed` with every node's reason (after the next nodes
   for failover), and the retry policy takes over; KEPT (the transport is stopping) -> the
   row stays pending for the next start.

A run's later transitions are RunTracker's too, never a transport's: the start
compare-and-set (`dispatched -> running` with the node, `claim_start`, asked by the node
through the manager's API), results (the API, or the transport's `on_result`), node lost.

`dispatch` returns at once: hand-overs run in tasks of the dispatcher's own, so a fire loop
never waits on a node. Least-busy routing counts this manager's runs in flight per node from
the moment it picks the node until the run's result (or its refusal).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from ays_runtime.manager.routing import Router
from ays_runtime.manager.runs import RunTracker
from ays_runtime.registry.base import NodeRef, NodeRegistry
from ays_runtime.storage.models import RouteStrategy
from ays_runtime.transport.base import Destination, Handed, Handover, JobDispatch, Transport

log = logging.getLogger("ays.dispatch")


def no_healthy_node(node_group: str) -> str:
    """The reason a run of `node_group` fails when the group has no node to take it."""
    return f"no healthy node in group {node_group}"


class Dispatcher:
    def __init__(
        self,
        registry: NodeRegistry,
        tracker: RunTracker,
        transport: Transport,
        router: Router | None = None,
    ) -> None:
        self.registry = registry
        self.tracker = tracker
        self.transport = transport
        self.router = router or Router()
        self._tasks: set[asyncio.Task[None]] = set()
        self._settling: set[asyncio.Task[None]] = set()
        tracker.on_finished = self._finished
        transport.on_result = tracker.record_result

    async def start(self) -> None:
        await self.transport.start()

    async def dispatch(self, jobs: Sequence[JobDispatch]) -> None:
        """Take responsibility for `jobs` (pending rows this manager claimed); returns at
        once. Each job-log id is given once."""
        wait = [job for job in jobs if self.registry.settling(job.node_group)]
        if wait:
            task = asyncio.create_task(self._when_settled(wait), name="dispatch-settling")
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
        self._route([job for job in jobs if job not in wait] if wait else jobs)

    async def stop(self, timeout: float) -> None:
        """Stop handing over: runs still waiting for their group stay pending; the transport
        finishes what it has in flight (within `timeout`), then the outcomes are recorded."""
        for waiting in self._settling:
            waiting.cancel()
        await self.transport.stop(timeout)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)

    # --- routing ----------------------------------------------------------------------------

    async def _when_settled(self, jobs: list[JobDispatch]) -> None:
        groups = {job.node_group for job in jobs}
        await asyncio.gather(*(self.registry.settled(group) for group in groups))
        self._route(jobs)

    def _route(self, jobs: Sequence[JobDispatch]) -> None:
        """Pick each run's destination now (so least-busy and round-robin see the whole
        burst in order) and hand each destination its runs in one batch."""
        batches: dict[tuple[str, str], tuple[Destination, list[JobDispatch]]] = {}
        for job in jobs:
            nodes = self.registry.healthy_nodes(job.node_group)
            if not nodes:
                self._spawn(self.tracker.dispatch_failed(job, no_healthy_node(job.node_group)))
                continue
            if job.is_first_broadcast:
                self._spawn(self._broadcast(job, nodes))
                continue
            if not self.transport.routes_to_nodes:
                to = Destination(job.node_group)
            elif job.route_strategy == RouteStrategy.FAILOVER.value:
                tries = self.router.candidates(job.route_strategy, nodes, job.task_id)
                self._spawn(self._failover(job, tries))
                continue
            else:
                node = self.router.candidates(job.route_strategy, nodes, job.task_id)[0]
                to = Destination(job.node_group, node)
                # Counted now, not on the answer: least-busy spreads the rest of this burst.
                self._count(node.address, +1)
            batches.setdefault((to.node_group, to.address), (to, []))[1].append(job)
        for to, chosen in batches.values():
            self._spawn(self._hand_over(to, chosen))

    async def _broadcast(self, job: JobDispatch, nodes: list[NodeRef]) -> None:
        """A broadcast's first send: one shard per healthy node, each to its node."""
        shards = await self.tracker.claim_shards(job, len(nodes))
        pairs = list(zip(shards, nodes, strict=False))
        for _, node in pairs:
            self._count(node.address, +1)
        await asyncio.gather(
            *(self._hand_over(Destination(job.node_group, node), [s]) for s, node in pairs)
        )

    async def _failover(self, job: JobDispatch, tries: list[NodeRef]) -> None:
        """Hand one run to the first of `tries` that takes it."""
        reasons: list[str] = []
        for node in tries:
            [handed] = await self.transport.hand_over(Destination(job.node_group, node), [job])
            if handed.outcome is Handover.DELIVERED:
                self._count(node.address, +1)
                await self.tracker.dispatched(job, node.address)
                return
            if handed.outcome is Handover.KEPT:
                return
            reasons.append(handed.reason)
        await self.tracker.dispatch_failed(job, "dispatch failed: " + "; ".join(reasons))

    # --- recording --------------------------------------------------------------------------

    async def _hand_over(self, to: Destination, jobs: list[JobDispatch]) -> None:
        """Hand `jobs` (counted in flight on `to`'s node, if any) over and record each
        outcome."""
        outcomes = await self.transport.hand_over(to, jobs)
        await asyncio.gather(
            *(self._record(to, job, handed) for job, handed in zip(jobs, outcomes, strict=True))
        )

    async def _record(self, to: Destination, job: JobDispatch, handed: Handed) -> None:
        if handed.outcome is Handover.DELIVERED:
            await self.tracker.dispatched(job, to.address)
            return
        if to.node is not None:
            self._count(to.address, -1)
        if handed.outcome is not Handover.KEPT:
            await self.tracker.dispatch_failed(job, f"dispatch failed: {handed.reason}")

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count(self, node: str, change: int) -> None:
        """This manager's runs in flight on `node` (least-busy routing adds them)."""
        self.router.in_flight[node] = max(0, self.router.in_flight.get(node, 0) + change)

    def _finished(self, node: str) -> None:
        self._count(node, -1)
