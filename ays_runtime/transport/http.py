"""The built-in transport: the manager POSTs runs to a node's HTTP API.

`hand_over(node, jobs)` sends the runs in one request (`POST /jobs/batch`, at most MAX_BATCH
runs each; a node of an older version, without that route, or one refusing the batch as too
large, gets them one by one on `POST /jobs`) and answers per run: DELIVERED (202), REFUSED
(the node's status and reason: 429 full, 503 stopping, ...), NOT_REACHED (no answer came
back). Which node, and what the job log says afterwards, is the manager's dispatcher's
(ays_runtime/manager/dispatch.py): this module knows nothing of routing or of the database.

A request that provably never reached the node is sent once more, on a fresh connection,
before it is answered NOT_REACHED: a connection refused, or a request written on a pooled
connection the node had just closed as idle (`RemoteProtocolError`, `ReadError`,
`WriteError`: no byte of answer came back). Sending a run twice is harmless, since a node
answers a job-log id it already holds as a duplicate and runs it once. The idle times of
both sides are set so that this stays rare (ays_runtime/web/keepalive.py).

Results come back to the manager's API (`/api/v1/job-logs/{id}/result`), not through this
class.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import httpx

from ays_runtime.auth import auth_headers
from ays_runtime.config import BuiltinTransportSettings
from ays_runtime.metrics import manager as metrics
from ays_runtime.protocol import API, RunAnswer, RunBatchAnswer
from ays_runtime.registry.base import NodeRef
from ays_runtime.transport.base import Destination, Handed, Handover, JobDispatch, Transport
from ays_runtime.web.keepalive import client_limits, fresh_connection_limits

log = logging.getLogger("ays.transport.http")

# Dispatch POSTs in flight at once. A slot of many tasks fires in one instant; unbounded,
# every run becomes a concurrent request and httpcore's pool rescans all of them per request.
MAX_CONCURRENT_DISPATCHES = 64
# Runs per batch request: bounds one request's size (a run is ~0.5-2 KB of JSON).
MAX_BATCH = 256
# Errors that say the request never got an answer because the connection failed under it:
# refused or reset before the node could answer. Sent once more (a timeout is not: the node
# may be working on it; it is answered NOT_REACHED at once).
NOT_DELIVERED = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
_DELIVERED = Handed(Handover.DELIVERED)


class BuiltinTransport(Transport):
    routes_to_nodes = True

    def __init__(
        self, settings: BuiltinTransportSettings, access_token: str, report_to: str
    ) -> None:
        self.settings = settings
        self.report_to = report_to
        self._headers = auth_headers(access_token)
        self._client: httpx.AsyncClient | None = None
        self._fresh: httpx.AsyncClient | None = None  # no pooling: for the one resend
        self._sending = asyncio.Semaphore(MAX_CONCURRENT_DISPATCHES)
        self._busy = 0  # hand-overs in flight
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False

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

    async def hand_over(self, to: Destination, jobs: Sequence[JobDispatch]) -> list[Handed]:
        node = to.node
        assert node is not None, "the built-in transport hands runs to a node"
        if self._stopping:
            return [Handed(Handover.KEPT, "the manager is stopping")] * len(jobs)
        self._busy += 1
        self._idle.clear()
        try:
            parts = [jobs[i : i + MAX_BATCH] for i in range(0, len(jobs), MAX_BATCH)]
            answers = await asyncio.gather(*(self._send_batch(node, part) for part in parts))
            return [handed for part in answers for handed in part]
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    async def stop(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Hand-overs begun by now finish (the dispatcher's tasks spawned just before this
        # begin theirs at the next turn of the loop, a failover's next node right after the
        # answer before): wait until none is in flight at a turn of the loop.
        while True:
            await asyncio.sleep(0)
            if not self._busy or loop.time() >= deadline:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), deadline - loop.time())
        self._stopping = True
        if self._busy:
            log.warning("%d dispatch request(s) still in flight at stop", self._busy)
        for client in (self._client, self._fresh):
            if client is not None:
                await client.aclose()

    async def _send_batch(self, node: NodeRef, jobs: Sequence[JobDispatch]) -> list[Handed]:
        """Hand `jobs` to `node` in one request."""
        body = {"runs": [self._request(job) for job in jobs]}
        try:
            response = await self._post(node, f"{node.url}{API}/jobs/batch", body)
        except httpx.HTTPError as err:
            metrics.transport_error("builtin", "publish", len(jobs))
            return [_not_reached(node, err)] * len(jobs)
        # 404/405: an older node, without the batch route; 413: too large together.
        if response.status_code in (404, 405, 413):
            return list(await asyncio.gather(*(self._send(node, job) for job in jobs)))
        if response.status_code != 200:
            why = f"{node.address}: HTTP {response.status_code} {response.text[:200]}"
            return [Handed(Handover.REFUSED, why)] * len(jobs)
        answers = {
            a.job_log_id: a for a in RunBatchAnswer.model_validate_json(response.content).runs
        }
        return [_answered(node, answers.get(job.job_log_id)) for job in jobs]

    async def _send(self, node: NodeRef, job: JobDispatch) -> Handed:
        """Hand one run to `node` on `POST /jobs` (a node without the batch route)."""
        try:
            response = await self._post(node, f"{node.url}{API}/jobs", self._request(job))
        except httpx.HTTPError as err:
            metrics.transport_error("builtin", "publish")
            return _not_reached(node, err)
        if response.status_code == 202:
            return _DELIVERED
        why = f"{node.address}: HTTP {response.status_code} {response.text[:200]}"
        return Handed(Handover.REFUSED, why)

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
        return job.run_request(self.report_to, queue_if_busy=job.queue_if_busy).model_dump(
            mode="json"
        )


def _not_reached(node: NodeRef, err: httpx.HTTPError) -> Handed:
    return Handed(Handover.NOT_REACHED, f"{node.address}: {type(err).__name__} {err}".strip())


def _answered(node: NodeRef, answer: RunAnswer | None) -> Handed:
    if answer is not None and answer.status_code == 202:
        return _DELIVERED
    if answer is None:
        why = "the node's answer did not mention this run"
    elif answer.status_code:
        why = f"HTTP {answer.status_code} {answer.detail}".strip()
    else:
        why = answer.detail
    return Handed(Handover.REFUSED, f"{node.address}: {why}")
