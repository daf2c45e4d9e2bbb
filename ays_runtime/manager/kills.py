"""Killing a run from the manager (`POST /api/v1/job-logs/{id}/kill`): wherever the run is, it
ends, and its job log says `killed` with the reason.

- pending (claimed, or a retry waiting its backoff): ended at once in the database; the nodes
  of its group are told too, since a dispatch of it may be on the wire;
- dispatched or running: the node holding it (named in the row, or, while no result has named
  it yet, every healthy node of the group: with RocketMQ any of them may hold it) is asked to
  kill it on its API; the node kills the whole process group, waits for it to end and reports
  the run `killed` as its result;
- no node holds it (its node is gone, or its result is on the way): after a short wait for
  that result, the run is ended `killed` in the database, so no run stays "running" for ever.

The nodes' kill route is on every node's HTTP API, whatever the transport.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx
from sqlalchemy import Engine, select

from ays_runtime.auth import auth_headers
from ays_runtime.exceptions import NotFoundError
from ays_runtime.manager.runs import UNFINISHED, RunTracker
from ays_runtime.protocol import API
from ays_runtime.registry.base import NodeRef, NodeRegistry
from ays_runtime.storage.models import JobLog, RunStatus, Task

log = logging.getLogger("ays.kills")

# How long a node may take to end a run: its kill grace (TERM, then KILL) plus the way there.
NODE_KILL_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
# After no node held the run: time for a result already on its way to arrive.
RESULT_IN_FLIGHT = 1.0


@dataclass(frozen=True)
class KillOutcome:
    job_log_id: int
    killed: bool  # False: the run had ended already (`status` says how)
    status: str  # the run's status when the request was answered
    detail: str


class RunKiller:
    def __init__(
        self, engine: Engine, registry: NodeRegistry, tracker: RunTracker, access_token: str
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.tracker = tracker
        self._headers = auth_headers(access_token)
        self.who = f"manager {tracker.manager_id}"

    async def kill(self, job_log_id: int, reason: str) -> KillOutcome:
        row = await asyncio.to_thread(self._load, job_log_id)
        if row is None:
            raise NotFoundError(f"job log {job_log_id} does not exist")
        status, node, group = row
        message = f"killed: {reason}"
        if status not in UNFINISHED:
            return KillOutcome(job_log_id, False, status, f"run {job_log_id} already ended")
        if status == RunStatus.PENDING.value:
            ended = await self.tracker.end_killed(job_log_id, message)
            await self._ask_nodes(job_log_id, self._holders("", group), reason)
            if ended:
                log.info(
                    "%s: run %d killed before it was dispatched: %s", self.who, job_log_id, reason
                )
                return KillOutcome(
                    job_log_id, True, RunStatus.KILLED.value, "ended before it was dispatched"
                )
            return await self._settled(job_log_id)
        killed_on = await self._ask_nodes(job_log_id, self._holders(node, group), reason)
        if killed_on:
            log.info("%s: run %d killed on node %s: %s", self.who, job_log_id, killed_on, reason)
            return KillOutcome(
                job_log_id, True, RunStatus.KILLED.value, f"killed on node {killed_on}"
            )
        await asyncio.sleep(RESULT_IN_FLIGHT)
        if await self.tracker.end_killed(job_log_id, f"{message} (no node held it)"):
            log.warning(
                "%s: run %d: no node held it; marked killed: %s", self.who, job_log_id, reason
            )
            return KillOutcome(
                job_log_id, True, RunStatus.KILLED.value, "no node held it: marked killed"
            )
        return await self._settled(job_log_id)

    async def _settled(self, job_log_id: int) -> KillOutcome:
        """The run ended by itself while we asked: say how."""
        row = await asyncio.to_thread(self._load, job_log_id)
        status = row[0] if row is not None else RunStatus.KILLED.value
        killed = status == RunStatus.KILLED.value
        return KillOutcome(job_log_id, killed, status, f"run {job_log_id} ended as {status}")

    def _holders(self, node: str, group: str) -> list[str]:
        if node:
            return [node]
        return [n.address for n in self.registry.healthy_nodes(group)]

    async def _ask_nodes(self, job_log_id: int, addresses: list[str], reason: str) -> str:
        """Ask each node to kill the run; the address of the one that did, or ""."""
        if not addresses:
            return ""
        async with httpx.AsyncClient(headers=self._headers, timeout=NODE_KILL_TIMEOUT) as client:
            answers = await asyncio.gather(
                *(self._ask(client, address, job_log_id, reason) for address in addresses)
            )
        return next(
            (address for address, killed in zip(addresses, answers, strict=True) if killed), ""
        )

    async def _ask(
        self, client: httpx.AsyncClient, address: str, job_log_id: int, reason: str
    ) -> bool:
        ip, _, port = address.rpartition(":")
        url = f"{NodeRef(ip, int(port), '').url}{API}/jobs/{job_log_id}/kill"
        try:
            response = await client.post(url, json={"reason": reason})
        except httpx.HTTPError as err:
            log.warning(
                "%s: run %d: cannot reach node %s to kill it: %r",
                self.who,
                job_log_id,
                address,
                err,
            )
            return False
        if response.status_code != 200:
            log.warning(
                "%s: run %d: node %s answered the kill with HTTP %d",
                self.who,
                job_log_id,
                address,
                response.status_code,
            )
            return False
        return bool(response.json().get("killed"))

    def _load(self, job_log_id: int) -> tuple[str, str, str] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(JobLog.status, JobLog.node, Task.node_group)
                .join(Task, Task.id == JobLog.task_id, isouter=True)
                .where(JobLog.id == job_log_id)
            ).first()
        if row is None:
            return None
        return row.status, row.node or "", row.node_group or ""
