"""The node's durable result spool, and the delivery of results to the manager.

A result is on disk before it is sent, and leaves the disk only when the manager has taken it
(or has said it never will): a manager that is down or restarting loses no result, and
neither does a node that is stopped or crashes meanwhile: the next process sends it.

    <node.data_dir>/results/<job_log_id>.json    {"report_to": URL, "report": JobResultReport}

Each file is written to a temp file in the same directory, fsynced, renamed into place, and
the directory fsynced: a crash leaves the whole file or none (`durable`).

Results finishing together share the work: they are written in one file, with one fsync
(group commit; `<first id>-<last id>.<pid>-<n>.json`, a JSON list of the records above),
and they travel to their manager in one request of up to RESULTS_PER_REQUEST. A file is
deleted once the manager has taken each of its results; after a crash, a result it had
taken while others of its file waited is sent again, and the manager answers it as a
duplicate.

Delivery (`ResultReporter`) goes through the transport's `ResultSink`; a result not taken
now is kept and retried with backoff (1 s doubling to 30 s, jittered) until it is taken. The
built-in sink (`HttpResultSink`) POSTs report_to + /api/v1/job-logs/results (several; the
answer has a status per result) or /api/v1/job-logs/{id}/result (one, or a manager of an
older version) with the token; for each result:
    2xx                          taken: the file is deleted
    401, 408, 429, 5xx, network  kept, retried
    any other 4xx (404: unknown job log)
                                 it can never succeed: logged, deleted
The manager's result endpoint is idempotent, so sending a result twice is harmless. A
manager that cannot be reached (network error) hands the results on to the node's next
manager (`ManagerPool`), which stores them in the same database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydantic

from ays_runtime.auth import auth_headers
from ays_runtime.metrics import node as node_metrics
from ays_runtime.node.durable import GroupFiles
from ays_runtime.node.managers import ManagerPool
from ays_runtime.protocol import API, JobResultReport, ResultBatchAnswer
from ays_runtime.storage.group_commit import Batcher, GroupCommit
from ays_runtime.transport.base import Delivery, ResultSink

log = logging.getLogger("ays.node.spool")

RESULTS_DIR = "results"
BACKOFF_START = 1.0  # seconds before the first retry
BACKOFF_MAX = 30.0  # a manager back from an outage hears from us within this
JITTER = 0.2  # +-20 %: nodes that lost the same manager do not retry in step
# Answers that say "not now" rather than "never": the request may succeed later.
RETRYABLE_4XX = frozenset({401, 408, 429})
REPORT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# Delivered results kept in memory, to hand over again when a transport redelivers a job
# that already ran here (RocketMQ: the node stopped between publishing and acking).
RECENT_RESULTS = 1000
# Results in one request to a manager: bounds its size (a result is up to the excerpt, 4 KB
# by default, of JSON).
RESULTS_PER_REQUEST = 100


@dataclass(frozen=True)
class SpooledResult:
    """A result waiting for the manager, and where to send it."""

    report_to: str
    report: JobResultReport

    @property
    def job_log_id(self) -> int:
        return self.report.job_log_id

    @property
    def url(self) -> str:
        return f"{self.report_to.rstrip('/')}{API}/job-logs/{self.job_log_id}/result"


class ResultSpool:
    """The results directory: `put` makes a result durable, `remove` forgets it.

    `put` and `remove` do blocking file I/O: call them from a worker thread on an event loop.
    """

    def __init__(self, directory: Path, who: str = "node") -> None:
        self.directory = directory
        self.who = who
        self._files = GroupFiles(directory, f"{who}: the result spool")

    def path(self, job_log_id: int) -> Path:
        """Where a result written alone lives."""
        return self._files.path(job_log_id)

    def load(self) -> list[SpooledResult]:
        """Create the directory if needed and read every spooled result, oldest run first.

        A temp file left by a crash is deleted (its writer died before the rename); one whose
        writer still lives is left alone (two nodes on one host may share a data dir: job-log
        ids are unique, so their results never collide, and sending another node's result
        is harmless). A file that cannot be read is renamed to `<name>.bad` with a log line,
        and left for an operator.
        """
        found: dict[int, SpooledResult] = {}
        for group in self._files.load():
            try:
                entries = [
                    SpooledResult(
                        report_to=str(data["report_to"]),
                        report=JobResultReport.model_validate(data["report"]),
                    )
                    for data in group.records
                ]
                if len(entries) == 1 and group.path.stem != str(entries[0].job_log_id):
                    raise ValueError(f"holds the result of run {entries[0].job_log_id}")
            except (ValueError, KeyError, TypeError, pydantic.ValidationError) as err:
                self._files.quarantine(group.path, _first_line(err))
                continue
            self._files.adopt(group, [entry.job_log_id for entry in entries])
            found.update((entry.job_log_id, entry) for entry in entries)
        return [found[job_log_id] for job_log_id in sorted(found)]

    def put(self, entry: SpooledResult) -> None:
        """Write the result durably (temp file, fsync, rename, fsync the directory)."""
        self.put_many([entry])

    def put_many(self, entries: Sequence[SpooledResult]) -> list[None]:
        """`put` for several results, in one file with one fsync."""
        self._files.write(
            [
                (
                    entry.job_log_id,
                    {"report_to": entry.report_to, "report": entry.report.model_dump(mode="json")},
                )
                for entry in entries
            ]
        )
        return [None] * len(entries)

    def remove(self, job_log_id: int) -> None:
        self.remove_many([job_log_id])

    def remove_many(self, job_log_ids: Sequence[int]) -> None:
        self._files.drop(job_log_ids)


class ResultReporter:
    """Sends results through the spool and the transport's sink, and retries what did not
    arrive.

    `report()` spools a result and tries it once; `run()` (a background task) retries the
    kept ones with backoff; `retry_now()` cuts the current wait short (e.g. when the manager
    answers heartbeats again); `flush()` tries once more before the node exits.
    """

    def __init__(self, spool: ResultSpool, sink: ResultSink, who: str) -> None:
        self.spool = spool
        self.who = who
        self.sink = sink
        self._pending: dict[int, SpooledResult] = {}
        self._recent: OrderedDict[int, SpooledResult] = OrderedDict()
        self._has_pending = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._outage = False  # a delivery failed and none has succeeded since
        self._durable = GroupCommit(spool.put_many)
        # Per destination: the results ready at the moment go in one delivery.
        self._senders: dict[str, Batcher[SpooledResult, Delivery]] = {}

    @property
    def pending(self) -> int:
        """Results on disk the manager has not taken yet."""
        return len(self._pending)

    def __contains__(self, job_log_id: int) -> bool:
        """Whether the result of `job_log_id` is kept, not delivered yet."""
        return job_log_id in self._pending

    def delivered(self, job_log_id: int) -> SpooledResult | None:
        """The result of `job_log_id` if it was delivered lately (the last RECENT_RESULTS)."""
        return self._recent.get(job_log_id)

    def adopt(self, entries: list[SpooledResult]) -> None:
        """Take over results spooled by an earlier process; `run()` sends them first thing."""
        for entry in entries:
            self._keep(entry)
        if entries:
            log.info(
                "%s: %d result(s) left in the spool by an earlier run: sending them",
                self.who,
                len(entries),
            )
            self._retry_now.set()

    async def report(self, entry: SpooledResult) -> None:
        """Make the result durable, then try to deliver it once (`run()` retries)."""
        try:
            await self._durable.submit(entry)
        except OSError as err:
            log.error(
                "%s: cannot write the result of run %d to %s: %s; sending it with no copy "
                "on disk (a node restart before the manager takes it loses it)",
                self.who,
                entry.job_log_id,
                self.spool.directory,
                err.strerror or err,
            )
        where = self.sink.destination(entry.report_to)
        if any(self.sink.destination(kept.report_to) == where for kept in self._pending.values()):
            self._keep(entry)  # that destination is not taking results: queue behind the others
            return
        if await self._send(entry, where) is Delivery.RETRY:
            self._keep(entry)

    async def _send(self, entry: SpooledResult, where: str) -> Delivery:
        """Deliver `entry` with the others bound for `where` at the moment (one request)."""
        sender = self._senders.get(where)
        if sender is None:
            sender = self._senders[where] = Batcher(self._deliver_many, RESULTS_PER_REQUEST)
        return await sender.submit(entry)

    def retry_now(self) -> None:
        if self._pending:
            self._retry_now.set()

    async def run(self) -> None:
        """Retry kept results until each is taken or refused. Runs until cancelled."""
        delay = BACKOFF_START
        while True:
            await self._has_pending.wait()
            if not self._retry_now.is_set():
                wait = delay * random.uniform(1 - JITTER, 1 + JITTER)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._retry_now.wait(), wait)
            self._retry_now.clear()
            if await self._send_pending():
                delay = BACKOFF_START
            else:
                delay = min(delay * 2, BACKOFF_MAX)

    async def flush(self, timeout: float) -> int:
        """Try every kept result once more, for at most `timeout` seconds; return how many
        are still kept (they stay on disk for the next process)."""
        if self._pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._send_pending(), timeout)
        return len(self._pending)

    async def _send_pending(self) -> bool:
        """Send kept results, oldest first, in batches per destination; after a destination
        does not take one now, skip the rest of its results this round. True when none is
        left."""
        by_destination: dict[str, list[SpooledResult]] = {}
        for job_log_id in sorted(self._pending):
            entry = self._pending[job_log_id]
            by_destination.setdefault(self.sink.destination(entry.report_to), []).append(entry)
        for entries in by_destination.values():
            for start in range(0, len(entries), RESULTS_PER_REQUEST):
                chunk = [
                    e
                    for e in entries[start : start + RESULTS_PER_REQUEST]
                    if e.job_log_id in self._pending
                ]
                if chunk and Delivery.RETRY in await self._deliver_many(chunk):
                    break
        return not self._pending

    async def _deliver_many(self, entries: list[SpooledResult]) -> list[Delivery]:
        answers = await self.sink.deliver_many([(e.report, e.report_to) for e in entries])
        gone = [
            e
            for e, (outcome, _) in zip(entries, answers, strict=True)
            if outcome is not Delivery.RETRY
        ]
        if gone:
            await asyncio.to_thread(self.spool.remove_many, [e.job_log_id for e in gone])
        for entry, (outcome, why) in zip(entries, answers, strict=True):
            self._settle(entry, outcome, why)
        return [outcome for outcome, _ in answers]

    def _settle(self, entry: SpooledResult, outcome: Delivery, why: str) -> None:
        """Book one delivery's outcome (its spool file is already gone unless RETRY)."""
        where = self.sink.destination(entry.report_to)
        node_metrics.result_settled(outcome.value)
        if outcome is Delivery.RETRY:
            if not self._outage:
                self._outage = True
                log.warning(
                    "%s: cannot report results to %s: %s; keeping them in %s and retrying",
                    self.who,
                    where,
                    why,
                    self.spool.directory,
                )
            else:
                log.debug("%s: result of run %d not taken: %s", self.who, entry.job_log_id, why)
            return
        self._pending.pop(entry.job_log_id, None)
        if not self._pending:
            self._has_pending.clear()
        if outcome is Delivery.REFUSED:
            log.error(
                "%s: %s refused the result of run %d (%s), which can never succeed: "
                "dropped it from the spool",
                self.who,
                where,
                entry.job_log_id,
                why,
            )
            return
        log.debug("%s: result of run %d reported", self.who, entry.job_log_id)
        self._recent[entry.job_log_id] = entry
        while len(self._recent) > RECENT_RESULTS:
            self._recent.popitem(last=False)
        if self._outage:
            self._outage = False
            log.info(
                "%s: %s takes results again (%d more in the spool)",
                self.who,
                where,
                len(self._pending),
            )

    def _keep(self, entry: SpooledResult) -> None:
        self._pending[entry.job_log_id] = entry
        self._has_pending.set()


class HttpResultSink(ResultSink):
    """The built-in transport's results: POST to the manager that dispatched the run, or,
    when it cannot be reached, to the next of the node's managers (`ManagerPool`): they
    share the database, so any of them stores it."""

    def __init__(
        self, client: httpx.AsyncClient, token: str, managers: ManagerPool | None = None
    ) -> None:
        self._client = client
        self._token = token
        self._managers = managers

    def destination(self, report_to: str) -> str:
        return report_to

    async def deliver(self, report: JobResultReport, report_to: str) -> tuple[Delivery, str]:
        (answer,) = await self.deliver_many([(report, report_to)])
        return answer

    async def deliver_many(
        self, items: Sequence[tuple[JobResultReport, str]]
    ) -> list[tuple[Delivery, str]]:
        """One request per manager; a single result, or a manager without the batch route,
        goes to the one-result route."""
        answers: list[tuple[Delivery, str]] = [(Delivery.RETRY, "not sent")] * len(items)
        by_manager: dict[str, list[int]] = {}
        for i, (_, report_to) in enumerate(items):
            by_manager.setdefault(report_to, []).append(i)
        for report_to, indexes in by_manager.items():
            reports = [items[i][0] for i in indexes]
            got = await self._post_to_any(reports, report_to)
            for i, answer in zip(indexes, got, strict=True):
                answers[i] = answer
        return answers

    async def _post_to_any(
        self, reports: list[JobResultReport], report_to: str
    ) -> list[tuple[Delivery, str]]:
        """To `report_to`, or on to the next manager while one cannot be reached."""
        managers = self._managers
        failures: list[str] = []
        for base in [report_to] if managers is None else managers.order(first=report_to):
            try:
                got = await self._post_batch(reports, base)
            except httpx.HTTPError as err:
                if managers is not None:
                    managers.failed(base)
                failures.append(f"{base}: {_network_error(err)}")
                continue
            if managers is not None:
                managers.answered(base)
            return got
        return [(Delivery.RETRY, "; ".join(failures))] * len(reports)

    async def _post_batch(
        self, reports: list[JobResultReport], base: str
    ) -> list[tuple[Delivery, str]]:
        """Raises httpx.HTTPError when the manager at `base` cannot be reached."""
        if len(reports) == 1:
            return [await self._post_one(reports[0], base)]
        response = await self._client.post(
            f"{base.rstrip('/')}{API}/job-logs/results",
            json={"results": [r.model_dump(mode="json") for r in reports]},
            headers=auth_headers(self._token),
            timeout=REPORT_TIMEOUT,
        )
        # 404/405: a manager of an older version; 413: too large together, each fits alone.
        if response.status_code in (404, 405, 413):
            return [await self._post_one(report, base) for report in reports]
        if response.status_code != 200:
            return [_outcome(response.status_code, _first_line(response.text))] * len(reports)
        by_id = {
            a.job_log_id: a for a in ResultBatchAnswer.model_validate_json(response.content).results
        }
        answers = []
        for report in reports:
            answer = by_id.get(report.job_log_id)
            if answer is None:
                answers.append((Delivery.RETRY, "the manager's answer did not mention it"))
            else:
                answers.append(_outcome(answer.status_code, answer.detail))
        return answers

    async def _post_one(self, report: JobResultReport, base: str) -> tuple[Delivery, str]:
        response = await self._client.post(
            SpooledResult(base, report).url,
            json=report.model_dump(mode="json"),
            headers=auth_headers(self._token),
            timeout=REPORT_TIMEOUT,
        )
        return _outcome(response.status_code, _first_line(response.text))


def _outcome(code: int, text: str) -> tuple[Delivery, str]:
    """What a manager's status code for one result means for that result."""
    if 200 <= code <= 299:
        return Delivery.TAKEN, f"HTTP {code}"
    why = f"HTTP {code} {text[:200]}".rstrip()
    if 400 <= code <= 499 and code not in RETRYABLE_4XX:
        return Delivery.REFUSED, why
    if code == 401:
        why += " (the manager does not accept this node's cluster_secret)"
    return Delivery.RETRY, why


def _network_error(err: httpx.HTTPError) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else repr(err)


def _first_line(value: object) -> str:
    text = str(value).strip()
    return text.splitlines()[0] if text else ""
