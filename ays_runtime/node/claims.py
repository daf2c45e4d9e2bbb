"""Start claims: a node runs a job only once a manager has recorded that this node runs it.

Every transport may hand a run over twice: the built-in one when a manager restarted before
it recorded a dispatch and sends the run again (perhaps to another node), RocketMQ when a
send was stored but its answer lost and the client sent it again (both copies are delivered,
to any nodes). A node's own memory of job-log ids stops a second copy on the same node only.
So, right before a run starts (after it waited its turn on this node), the node claims it:
`POST <manager>/api/v1/job-logs/claims`, and the manager moves the row from pending or
dispatched to running with this node and the start time, by compare-and-set. The one claim
that wins runs; a copy whose claim loses (another node holds the run, or it has ended) is
not run and reports nothing (its message, if any, is acked: the run is taken care of).

Claims of runs starting together travel in one request per manager (a request in flight
collects the next ones: group commit, no waiting window), and the manager writes them in
one transaction.

A claim goes to the manager that dispatched the run, or, when that one cannot be reached
(a network error), to the node's next manager (`ManagerPool`): they share the database.
When no manager answers (down, restarting, the database failing: any network error or
non-200), the claim is asked again with backoff (0.5 s doubling to 5 s, jittered) for up to
`node.start_claim_wait` seconds (60 by default). Past that the run is not started: it ends
`failed` with "not started: no manager confirmed the start" (reported through the spool
like any result, so it arrives once a manager is back, and the task's retry policy
applies). A job never runs unrecorded.
A claim whose request reached the manager but whose answer was lost is asked again; the
answer "running on this node" to a repeated ask means the first one won, and the run starts.

A manager of an older version, without the claims route (404/405), cannot record a claim:
the run starts as before (logged once per manager).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass

import httpx

from ays_runtime.auth import auth_headers
from ays_runtime.node.managers import ManagerPool
from ays_runtime.protocol import API, StartClaimAnswer, StartClaimAnswers
from ays_runtime.retry import Backoff
from ays_runtime.storage.group_commit import Batcher
from ays_runtime.storage.models import RunStatus

log = logging.getLogger("ays.node.claims")

# Seconds a run waits for a manager to confirm its start before it is given up (not run):
# the default of node.start_claim_wait; covers a manager restart or reload and a short
# database outage.
CLAIM_WAIT = 60.0
CLAIM_TIMEOUT = httpx.Timeout(10.0, connect=3.0)


class Claim(enum.Enum):
    CLAIMED = "claimed"  # this node runs it
    TAKEN = "taken"  # another node holds it, or it has ended: not run here
    UNANSWERED = "unanswered"  # no manager confirmed within CLAIM_WAIT: not run


@dataclass(frozen=True)
class ClaimOutcome:
    claim: Claim
    detail: str = ""


class _Unanswered(Exception):
    """The manager did not answer the claim request (the message says why)."""


class _Unreachable(_Unanswered):
    """The manager could not be reached at all: the next manager may be asked."""


class StartClaims:
    def __init__(
        self,
        client: httpx.AsyncClient,
        token: str,
        address: str,
        who: str,
        wait: float = CLAIM_WAIT,
        managers: ManagerPool | None = None,
    ) -> None:
        self._managers = managers  # where a claim goes when report_to cannot be reached
        self._client = client
        self._headers = auth_headers(token)
        self.address = address
        self.who = who
        self.wait = wait
        self._batchers: dict[str, Batcher[int, StartClaimAnswer | None]] = {}
        self._older: set[str] = set()  # managers without the claims route (logged once)

    async def claim(self, job_log_id: int, report_to: str) -> ClaimOutcome:
        """Ask `report_to`'s manager to record that this node starts run `job_log_id`."""
        deadline = time.monotonic() + self.wait
        backoff = Backoff(first=0.5, cap=5.0)
        asked = False
        why = ""
        while True:
            try:
                answer = await self._batcher(report_to).submit(job_log_id)
            except _Unanswered as err:
                asked, why = True, str(err)
                delay = backoff.next()
                if time.monotonic() + delay > deadline:
                    return ClaimOutcome(
                        Claim.UNANSWERED,
                        f"not started: no manager confirmed the start within {self.wait:g}s "
                        f"(last: {why})",
                    )
                log.warning(
                    "%s: run %d: the manager did not answer its start claim (%s); asking again",
                    self.who,
                    job_log_id,
                    why,
                )
                await asyncio.sleep(delay)
                continue
            if answer is None or answer.claimed:
                return ClaimOutcome(Claim.CLAIMED)
            ours = answer.node == self.address and answer.status == RunStatus.RUNNING.value
            if ours and asked:  # our earlier ask won; its answer was lost
                return ClaimOutcome(Claim.CLAIMED)
            if not answer.status:
                return ClaimOutcome(Claim.TAKEN, "the manager does not know this run")
            holder = f" on {answer.node}" if answer.node else ""
            return ClaimOutcome(Claim.TAKEN, f"it is {answer.status}{holder}")

    def _batcher(self, report_to: str) -> Batcher[int, StartClaimAnswer | None]:
        batcher = self._batchers.get(report_to)
        if batcher is None:

            async def send(ids: list[int]) -> list[StartClaimAnswer | None]:
                return await self._send(report_to, ids)

            batcher = self._batchers[report_to] = Batcher(send)
        return batcher

    async def _send(self, report_to: str, ids: list[int]) -> list[StartClaimAnswer | None]:
        """One claim request for `ids`, to `report_to` or, while a manager cannot be
        reached, the node's next one (managers share the database): an answer per id
        (None: an older manager that does not record claims). Raises _Unanswered."""
        managers = self._managers
        failures: list[str] = []
        for base in [report_to] if managers is None else managers.order(first=report_to):
            try:
                return await self._send_to(base, ids)
            except _Unreachable as err:
                if managers is not None:
                    managers.failed(base)
                failures.append(f"{base}: {err}")
        raise _Unanswered("; ".join(failures))

    async def _send_to(self, report_to: str, ids: list[int]) -> list[StartClaimAnswer | None]:
        url = f"{report_to.rstrip('/')}{API}/job-logs/claims"
        body = {"node": self.address, "job_log_ids": ids}
        try:
            response = await self._client.post(
                url, json=body, headers=self._headers, timeout=CLAIM_TIMEOUT
            )
        except httpx.HTTPError as err:
            raise _Unreachable(f"{type(err).__name__} {err}".strip()) from None
        if response.status_code in (404, 405):
            if report_to not in self._older:
                self._older.add(report_to)
                log.warning(
                    "%s: the manager at %s records no start claims (an older version): runs "
                    "start unclaimed",
                    self.who,
                    report_to,
                )
            return [None] * len(ids)
        if response.status_code != 200:
            raise _Unanswered(f"HTTP {response.status_code} {response.text[:200]}")
        try:
            answers = StartClaimAnswers.model_validate_json(response.content).claims
        except ValueError as err:
            raise _Unanswered(f"an answer that is not a claim answer: {err}") from None
        by_id = {answer.job_log_id: answer for answer in answers}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise _Unanswered(f"the answer does not mention run(s) {missing}")
        return [by_id[i] for i in ids]
