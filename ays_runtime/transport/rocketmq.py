"""The RocketMQ transport, manager side: jobs go out on node-group topics, results come back
on the result topic. (The node's side is `ays_runtime/node/rocketmq.py`; topic and group names
and the client boundary are in `rocketmq_client.py`.)

Hand-over. The manager's dispatcher (ays_runtime/manager/dispatch.py) decides where each run
goes and records what became of it; this class publishes and answers. A run for the group's
queue (`Destination` without a node) is one message on `<topic_prefix><group>`: key =
job-log id, tag = task type, body = the RunRequest JSON. The group's nodes consume it with one
consumer group, so one node takes it: which one is the broker's choice, so route strategies
other than broadcast do not apply (`routes_to_nodes` is False), and the job-log row is
`dispatched` with no node until the node that took the job claims its start (`running`,
with that node: node/claims.py). A message the broker delivers twice (a send repeated after
its answer was lost) runs once: only one copy wins the claim.

A run for one node (a broadcast's shard: the dispatcher claimed one shard per healthy node)
is published on `<topic_prefix><group>_bcast`, tagged with its node (`n_<ip>_<port>`); every
node consumes that topic with a consumer group of its own, filtered on its own tag, so each
shard reaches exactly the node it was addressed to. A retried shard is a plain run for the
group's queue (any node).

Results. Nodes publish JobResultReport JSON to `result_topic`; every manager consumes it with
the consumer group `<topic_prefix>manager` (one manager stores each result: they share the
database), stores it (`RunTracker.record_result`, idempotent) and acks it. A result that
could not be stored is not acked: the broker delivers it again.

Outages. When the proxy cannot be reached, runs stay queued here (their hand-over is not
answered yet, their rows stay pending), the outage is logged once, sends are retried with
backoff (one run at a time until one goes through), and everything queued is published when
the proxy is back; the return is logged with the outage's length. Runs still queued at stop
are answered KEPT: their rows stay pending and the manager's next start publishes them
(`RunTracker.recover_pending`). A missing topic is not an outage: the run is REFUSED with
the `mqadmin updateTopic` command that creates it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydantic

from ays_runtime.config import RocketMQTransportSettings
from ays_runtime.exceptions import TransientTransportError, TransportError
from ays_runtime.metrics import manager as metrics
from ays_runtime.protocol import JobResultReport
from ays_runtime.retry import Backoff
from ays_runtime.transport import rocketmq_client as mq
from ays_runtime.transport.base import Destination, Handed, Handover, JobDispatch, Transport

log = logging.getLogger("ays.transport.rocketmq")

WINDOW = 64  # sends in flight at once
RESULT_BATCH = 32  # results taken per receive (the proxy's maximum)
RESULT_INVISIBLE = 30  # seconds a taken result stays hidden from other managers
RESULT_AWAIT = 10  # long-poll seconds of one receive


@dataclass(frozen=True)
class _Outgoing:
    job: JobDispatch
    to: Destination
    answer: asyncio.Future[Handed]  # set once published, refused, or kept at stop


class RocketMQTransport(Transport):
    routes_to_nodes = False

    def __init__(
        self,
        settings: RocketMQTransportSettings,
        report_to: str,
        log_dir: str | Path,
        who: str,
    ) -> None:
        self.settings = settings
        self.report_to = report_to
        self.log_dir = Path(log_dir)
        self.who = who
        self._queue: deque[_Outgoing] = deque()
        self._batch: list[_Outgoing] = []  # being published
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._down_since: float | None = None
        self._publisher: mq.Publisher | None = None
        self._results: mq.Receiver | None = None
        self._receive_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="ays-mq-results"
        )
        self._ack_pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="ays-mq-ack")
        self._tasks: list[asyncio.Task[None]] = []

    # --- the Transport contract -----------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(mq.load_client, self.log_dir, self.who)
        self._publisher = mq.Publisher(self.settings, self.who)
        await self._publisher.start()
        self._results = mq.Receiver(
            self.settings,
            mq.manager_consumer(self.settings),
            self.settings.result_topic,
            await_duration=RESULT_AWAIT,
            who=self.who,
        )
        self._tasks = [
            asyncio.create_task(self._publish_loop(), name="ays-mq-publish"),
            asyncio.create_task(self._result_loop(), name="ays-mq-results"),
        ]
        log.info(
            "%s: RocketMQ transport on %s: jobs to %s<group>, results from %s",
            self.who,
            ", ".join(self.settings.endpoints),
            self.settings.topic_prefix,
            self.settings.result_topic,
        )

    async def hand_over(self, to: Destination, jobs: Sequence[JobDispatch]) -> list[Handed]:
        if self._stopping.is_set():
            return [Handed(Handover.KEPT, "the manager is stopping")] * len(jobs)
        loop = asyncio.get_running_loop()
        items = [_Outgoing(job, to, loop.create_future()) for job in jobs]
        self._queue.extend(items)
        self._wake.set()
        return list(await asyncio.gather(*(item.answer for item in items)))

    async def stop(self, timeout: float) -> None:
        self._stopping.set()
        self._wake.set()
        results = self._results
        if results is not None:  # ends the long poll in flight
            await asyncio.to_thread(results.close)
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._queue:
            log.info(
                "%s: %d job(s) not published stay pending; the next start publishes them",
                self.who,
                len(self._queue),
            )
        for item in [*self._batch, *self._queue]:  # a batch cut short by the time box too
            _answer(item, Handed(Handover.KEPT, "not published"))
        self._queue.clear()
        if self._publisher is not None:
            await self._publisher.close()
        self._receive_pool.shutdown(wait=True, cancel_futures=True)
        self._ack_pool.shutdown(wait=True, cancel_futures=True)

    # --- publishing -------------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        backoff = Backoff(first=0.5, cap=5.0)
        while not self._stopping.is_set():
            await self._wake.wait()
            self._wake.clear()
            while self._queue and not self._stopping.is_set():
                count = 1 if self._down_since is not None else min(WINDOW, len(self._queue))
                batch = self._batch = [self._queue.popleft() for _ in range(count)]
                outcomes = await asyncio.gather(*(self._publish(item) for item in batch))
                again = [item for item, done in zip(batch, outcomes, strict=True) if not done]
                if not again:
                    backoff.reset()
                    continue
                self._queue.extendleft(reversed(again))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff.next())

    async def _publish(self, item: _Outgoing) -> bool:
        """Publish one run and answer its hand-over; False: not now, try again later."""
        job, node = item.job, item.to.node
        assert self._publisher is not None
        if node is None:
            topic, tag = mq.group_topic(self.settings, job.node_group), job.task_type
        else:
            topic, tag = (
                mq.broadcast_topic(self.settings, job.node_group),
                mq.node_tag(node.address),
            )
        sent_at = time.monotonic()
        try:
            await self._publisher.send(
                topic,
                job.run_request(self.report_to).model_dump_json().encode(),
                key=str(job.job_log_id),
                tag=tag,
                properties={"ays_task_type": job.task_type},
            )
        except TransientTransportError as err:
            metrics.transport_error("rocketmq", "publish")
            self._went_down(str(err))
            return False
        except TransportError as err:
            metrics.transport_error("rocketmq", "publish")
            _answer(item, Handed(Handover.REFUSED, str(err)))
            return True
        self._came_back(sent_at)
        _answer(item, Handed(Handover.DELIVERED))
        return True

    def _went_down(self, why: str) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "%s: cannot publish to RocketMQ (%s); fired jobs stay pending in the job log "
                "and are published when the proxy is back",
                self.who,
                why,
            )

    def _came_back(self, sent_at: float) -> None:
        # Only a send begun after the outage was seen ends it: one of the same window that was
        # answered late, just before the proxy went, says nothing about it being back.
        if self._down_since is not None and sent_at >= self._down_since:
            away = time.monotonic() - self._down_since
            self._down_since = None
            log.info(
                "%s: RocketMQ takes jobs again after %.1fs; publishing %d queued job(s)",
                self.who,
                away,
                len(self._queue),
            )
            self._wake.set()

    # --- results ----------------------------------------------------------------------------

    async def _result_loop(self) -> None:
        assert self._results is not None
        loop = asyncio.get_running_loop()
        backoff = Backoff(first=1.0, cap=5.0)
        failing_since: float | None = None
        while not self._stopping.is_set():
            try:
                messages = await loop.run_in_executor(
                    self._receive_pool, self._results.receive, RESULT_BATCH, RESULT_INVISIBLE
                )
            except TransportError as err:
                if self._stopping.is_set():
                    return
                metrics.transport_error("rocketmq", "consume")
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning(
                        "%s: cannot take results from %s (%s); retrying",
                        self.who,
                        self.settings.result_topic,
                        err,
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff.next())
                continue
            if failing_since is not None:
                log.info(
                    "%s: results flow again from %s after %.1fs",
                    self.who,
                    self.settings.result_topic,
                    time.monotonic() - failing_since,
                )
                failing_since = None
            backoff.reset()
            await asyncio.gather(*(self._store(message) for message in messages))

    async def _store(self, message: mq.Message) -> None:
        assert self._results is not None
        try:
            report = JobResultReport.model_validate_json(message.body)
        except pydantic.ValidationError as err:
            metrics.transport_error("rocketmq", "consume")
            log.error(
                "%s: message %s on %s is not a job result (%s): dropped",
                self.who,
                message.message_id,
                self.settings.result_topic,
                str(err).splitlines()[0],
            )
        else:
            try:
                assert self.on_result is not None, "the manager sets on_result before start"
                await self.on_result(report)
            except Exception:  # a database error: leave it to the broker to deliver again
                log.exception(
                    "%s: cannot store the result of run %d; it comes back in %ds",
                    self.who,
                    report.job_log_id,
                    RESULT_INVISIBLE,
                )
                return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._ack_pool, self._results.ack, message)
        except TransportError as err:  # stored: a redelivery is ignored as a duplicate
            log.debug("%s: result message %s not acked: %s", self.who, message.message_id, err)


def _answer(item: _Outgoing, handed: Handed) -> None:
    if not item.answer.done():  # a hand-over cancelled meanwhile: nobody waits
        item.answer.set_result(handed)
