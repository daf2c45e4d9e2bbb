"""The built-in transport: the manager POSTs each run to a node's HTTP API.

Delivery runs in background tasks so the fire loop never waits on a node. The runs of a burst
that go to the same node travel in one request (`POST /jobs/batch`): one request per node
per burst, not one per run (a node of an older version, without that route, gets them one by
one).

A request that provably never reached the node is sent once more, on a fresh connection,
before a run is failed: a connection refused, or a request written on a pooled connection
the node had just closed as idle (`RemoteProtocolError`, `ReadError`, `WriteError`: no byte
of answer came back). Sending a run twice is harmless, since a node answers a job-log id it
already holds as a duplicate and runs it once. The idle times of both sides are set so that
this stays rare (ays_runtime/web/keepalive.py); failover then goes on to the next node.

Failover and the first send of a broadcast go run by run, since each run's node depends
on the answer before it. A run that no node accepts is failed at once with the reasons ("no
healthy node in group g", "10.0.0.5:18181: connection refused"), and the retry policy takes
over. Results come back to the manager's
API (`/api/v1/job-logs/{id}/result`), not through this class.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

import httpx

from ays_runtime.auth import auth_headers
from ays_runtime.config import BuiltinTransportSettings
from ays_runtime.manager.routing import Router
from ays_runtime.manager.runs import RunTracker
from ays_runtime.metrics import manager as metrics
from ays_runtime.protocol import API, RunAnswer, RunBatchAnswer
from ays_runtime.registry.base import NodeRef, NodeRegistry
from ays_runtime.storage.models import RouteStrategy
from ays_runtime.transport.base import JobDispatch, Transport
from ays_runtime.web.keepalive import client_limits, fresh_connection_limits

log = logging.getLogger("ays.transport.http")

# Dispatch POSTs in flight at once. A slot of many tasks fires in one instant; unbounded,
# every run becomes a concurrent request and httpcore's pool rescans all of them per request.
MAX_CONCURRENT_DISPATCHES = 64
# Runs per batch request: bounds one request's size (a run is ~0.5-2 KB of JSON).
MAX_BATCH = 256
# Errors that say the request never got an answer because the connection failed under it:
# refused or reset before the node could answer. Sent once more (a timeout is not: the node
# may be working on it, and the retry policy takes over).
NOT_DELIVERED = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


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
        self._fresh: httpx.AsyncClient | None = None  # no pooling: for the one resend
        self._inflight: set[asyncio.Task[None]] = set()
        self._sending = asyncio.Semaphore(MAX_CONCURRENT_DISPATCHES)
        tracker.on_finished = self._finished

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=self.settings.dispatch_timeout,
            headers=self._headers,
            limits=client_limits(MAX_CONCURRENT_DISPATCHES),
        )
        self._fresh = httpx.AsyncClient(
            timeout=self.settings.dispatch_timeout,
            headers=self._headers,
            limits=fresh_connection_limits(),
        )

    async def dispatch(self, jobs: Sequence[JobDispatch]) -> None:
        batches: dict[str, tuple[NodeRef, list[JobDispatch]]] = {}
        for job in jobs:
            if _one_by_one(job):
                self._spawn(self._deliver(job))
                continue
            nodes = self.registry.healthy_nodes(job.node_group)
            if not nodes:
                self._spawn(
                    self.tracker.dispatch_failed(job, f"no healthy node in group {job.node_group}")
                )
                continue
            node = self.router.candidates(job.route_strategy, nodes, job.task_id)[0]
            # Counted now, not on the answer: least-busy spreads the rest of this burst.
            self._count(node.address, +1)
            batches.setdefault(node.address, (node, []))[1].append(job)
        for node, chosen in batches.values():
            for start in range(0, len(chosen), MAX_BATCH):
                self._spawn(self._send_batch(node, chosen[start : start + MAX_BATCH]))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def stop(self, timeout: float) -> None:
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=timeout)
        for client in (self._client, self._fresh):
            if client is not None:
                await client.aclose()

    async def _deliver(self, job: JobDispatch) -> None:
        """A failover run, or the first send of a broadcast (see `_one_by_one`)."""
        nodes = self.registry.healthy_nodes(job.node_group)
        if not nodes:
            await self.tracker.dispatch_failed(job, f"no healthy node in group {job.node_group}")
            return
        if job.route_strategy == RouteStrategy.FAILOVER.value:
            await self._send(job, self.router.candidates(job.route_strategy, nodes, job.task_id))
            return
        shards = await self.tracker.claim_shards(job, len(nodes))
        await asyncio.gather(
            *(self._send(shard, [node]) for shard, node in zip(shards, nodes, strict=False))
        )

    async def _send_batch(self, node: NodeRef, jobs: list[JobDispatch]) -> None:
        """Hand `jobs` (already counted in flight on `node`) to `node` in one request."""
        body = {"runs": [self._request(job) for job in jobs]}
        try:
            response = await self._post(node, f"{node.url}{API}/jobs/batch", body)
        except httpx.HTTPError as err:
            metrics.transport_error("builtin", "publish", len(jobs))
            reason = f"dispatch failed: {node.address}: {type(err).__name__} {err}".strip()
            self._count(node.address, -len(jobs))
            await asyncio.gather(*(self.tracker.dispatch_failed(job, reason) for job in jobs))
            return
        # 404/405: an older node, without the batch route; 413: too large together.
        if response.status_code in (404, 405, 413):
            self._count(node.address, -len(jobs))
            await asyncio.gather(*(self._send(job, [node]) for job in jobs))
            return
        answers: dict[int, RunAnswer] = {}
        if response.status_code == 200:
            answers = {
                a.job_log_id: a for a in RunBatchAnswer.model_validate_json(response.content).runs
            }
        else:
            why = f"HTTP {response.status_code} {response.text[:200]}"
            answers = {
                job.job_log_id: RunAnswer(job_log_id=job.job_log_id, status_code=0, detail=why)
                for job in jobs
            }
        taken: list[JobDispatch] = []
        refused: list[JobDispatch] = []
        for job in jobs:
            (taken if _taken(answers.get(job.job_log_id)) else refused).append(job)
        self._count(node.address, -len(refused))
        await asyncio.gather(
            *(self.tracker.dispatched(job, node.address) for job in taken),
            *(
                self.tracker.dispatch_failed(
                    job, f"dispatch failed: {node.address}: {_refusal(answers.get(job.job_log_id))}"
                )
                for job in refused
            ),
        )

    async def _send(self, job: JobDispatch, tries: list[NodeRef]) -> None:
        """Hand one run to the first of `tries` that takes it."""
        request = self._request(job)
        reasons: list[str] = []
        for node in tries:
            try:
                response = await self._post(node, f"{node.url}{API}/jobs", request)
            except httpx.HTTPError as err:
                metrics.transport_error("builtin", "publish")
                reasons.append(f"{node.address}: {type(err).__name__} {err}".strip())
                continue
            if response.status_code == 202:
                self._count(node.address, +1)
                await self.tracker.dispatched(job, node.address)
                return
            reasons.append(f"{node.address}: HTTP {response.status_code} {response.text[:200]}")
        await self.tracker.dispatch_failed(job, "dispatch failed: " + "; ".join(reasons))

    async def _post(self, node: NodeRef, url: str, body: dict[str, Any]) -> httpx.Response:
        """POST `body` to `node`; a request that never reached it is sent once more on a
        fresh connection (see the module docstring). Raises httpx.HTTPError."""
        assert self._client is not None and self._fresh is not None, "start() first"
        async with self._sending:
            try:
                return await self._client.post(url, json=body)
            except NOT_DELIVERED as err:
                log.info(
                    "dispatch to %s did not reach it (%s): sending again on a new connection",
                    node.address,
                    type(err).__name__,
                )
            return await self._fresh.post(url, json=body)

    def _request(self, job: JobDispatch) -> dict[str, Any]:
        # Failover: a full node answers 429 and the next node is asked instead.
        failover = job.route_strategy == RouteStrategy.FAILOVER.value
        return job.run_request(self.report_to, queue_if_busy=not failover).model_dump(mode="json")

    def _count(self, node: str, change: int) -> None:
        """This manager's runs in flight on `node` (least-busy routing adds them)."""
        self.router.in_flight[node] = max(0, self.router.in_flight.get(node, 0) + change)

    def _finished(self, node: str) -> None:
        self._count(node, -1)


def _one_by_one(job: JobDispatch) -> bool:
    """Failover asks node after node; a broadcast's first send claims a shard per node."""
    return job.route_strategy == RouteStrategy.FAILOVER.value or job.is_first_broadcast


def _taken(answer: RunAnswer | None) -> bool:
    return answer is not None and answer.status_code == 202


def _refusal(answer: RunAnswer | None) -> str:
    if answer is None:
        return "the node's answer did not mention this run"
    return (
        f"HTTP {answer.status_code} {answer.detail}".strip()
        if answer.status_code
        else answer.detail
    )
