"""The built-in transport: the manager POSTs each run to a node's HTTP API.

Delivery runs in background tasks so the fire loop never waits on a node. A run that no node
accepts is failed at once with the reasons ("no healthy node in group g", "10.0.0.5:18181:
connection refused"), and the retry policy takes over. Results come back to the manager's
API (`/api/v1/job-logs/{id}/result`), not through this class.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import httpx

from ays_runtime.auth import auth_headers
from ays_runtime.config import BuiltinTransportSettings
from ays_runtime.manager.routing import Router
from ays_runtime.manager.runs import RunTracker
from ays_runtime.protocol import API, RunRequest
from ays_runtime.registry.base import NodeRef, NodeRegistry
from ays_runtime.storage.models import RouteStrategy
from ays_runtime.transport.base import JobDispatch, Transport

log = logging.getLogger("ays.transport.http")

# Dispatch POSTs in flight at once. A slot of many tasks fires in one instant; unbounded,
# every run becomes a concurrent request and httpcore's pool rescans all of them per request.
MAX_CONCURRENT_DISPATCHES = 64


class BuiltinTransport(Transport):
    def __init__(
        self,
        settings: BuiltinTransportSettings,
        registry: NodeRegistry,
        tracker: RunTracker,
        access_token: str,
        report_to: str,
        router: Router | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.tracker = tracker
        self.router = router or Router()
        self.report_to = report_to
        self._headers = auth_headers(access_token)
        self._client: httpx.AsyncClient | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._sending = asyncio.Semaphore(MAX_CONCURRENT_DISPATCHES)
        tracker.on_finished = self._finished

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=self.settings.dispatch_timeout,
            headers=self._headers,
            limits=httpx.Limits(
                max_connections=MAX_CONCURRENT_DISPATCHES,
                max_keepalive_connections=MAX_CONCURRENT_DISPATCHES,
            ),
        )

    async def dispatch(self, jobs: Sequence[JobDispatch]) -> None:
        for job in jobs:
            task = asyncio.create_task(self._deliver(job))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def stop(self, timeout: float) -> None:
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=timeout)
        if self._client is not None:
            await self._client.aclose()

    async def _deliver(self, job: JobDispatch) -> None:
        nodes = self.registry.healthy_nodes(job.node_group)
        if not nodes:
            await self.tracker.dispatch_failed(job, f"no healthy node in group {job.node_group}")
            return
        strategy = job.route_strategy
        is_first_broadcast = (
            strategy == RouteStrategy.BROADCAST.value and job.shard_total == 1 and job.attempt == 0
        )
        if is_first_broadcast:
            shards = await self.tracker.claim_shards(job, len(nodes))
            await asyncio.gather(
                *(self._send(shard, [node]) for shard, node in zip(shards, nodes, strict=False))
            )
            return
        candidates = self.router.candidates(strategy, nodes, job.task_id)
        tries = candidates if strategy == RouteStrategy.FAILOVER.value else candidates[:1]
        await self._send(job, tries)

    async def _send(self, job: JobDispatch, tries: list[NodeRef]) -> None:
        assert self._client is not None, "start() first"
        failover = job.route_strategy == RouteStrategy.FAILOVER.value
        request = RunRequest(
            job_log_id=job.job_log_id,
            task_id=job.task_id,
            task_name=job.task_name,
            task_type=job.task_type,
            payload=job.payload,
            timeout_s=job.timeout_s,
            params=job.params,
            attempt=job.attempt,
            shard_index=job.shard_index,
            shard_total=job.shard_total,
            scheduled_at=job.scheduled_at,
            block_strategy=job.block_strategy,
            queue_if_busy=not failover,
            report_to=self.report_to,
        ).model_dump(mode="json")
        reasons: list[str] = []
        for node in tries:
            try:
                async with self._sending:
                    response = await self._client.post(f"{node.url}{API}/jobs", json=request)
            except httpx.HTTPError as err:
                reasons.append(f"{node.address}: {type(err).__name__} {err}".strip())
                continue
            if response.status_code == 202:
                self.router.in_flight[node.address] = self.router.in_flight.get(node.address, 0) + 1
                await self.tracker.dispatched(job, node.address)
                return
            reasons.append(f"{node.address}: HTTP {response.status_code} {response.text[:200]}")
        await self.tracker.dispatch_failed(job, "dispatch failed: " + "; ".join(reasons))

    def _finished(self, node: str) -> None:
        count = self.router.in_flight.get(node, 0)
        if count > 0:
            self.router.in_flight[node] = count - 1
