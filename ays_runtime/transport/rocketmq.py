"""The RocketMQ transport, manager side: jobs go out on node-group topics, results come back
on the result topic. (The node's side is `ays_runtime/node/rocketmq.py`; topic and group names
and the client boundary are in `rocketmq_client.py`.)

Dispatch. Each job is one message on `<topic_prefix><group>`: key = job-log id, tag = task
type, body = the RunRequest JSON. The group's nodes consume it with one consumer group, so
one node takes it. As with the built-in transport a fire needs at least one healthy node in
its group ("no healthy node in group g" fails it at once, and the retry policy applies);
which node runs it is the broker's choice, so route strategies other than broadcast do not
apply, and the job-log row is `dispatched` with no node until the node that took the job
claims its start (`running`, with that node: node/claims.py). A message the broker delivers
twice (a send repeated after its answer was lost) runs once: only one copy wins the claim.

Broadcast (the first attempt of a `broadcast` task). The manager decides the shard count:
the group's healthy nodes in the registry at that moment, N. It claims the slot's N shard
rows (`RunTracker.claim_shards`: shard i of N, one job-log row each) and publishes one message
per shard on `<topic_prefix><group>_bcast`, tagged with its node (`n_<ip>_<port>`); every
node consumes that topic with a consumer group of its own, filtered on its own tag, so each
shard reaches exactly the node it was addressed to. The row records that node, so a node
that goes offline has its shard failed as node_lost (and retried per policy) exactly as with
the built-in transport. A retried shard is a plain job on the group topic (any node).

Results. Nodes publish JobResultReport JSON to `result_topic`; every manager consumes it with
the consumer group `<topic_prefix>manager` (one manager stores each result: they share the
database), stores it (`RunTracker.record_result`, idempotent) and acks it. A result that
could not be stored is not acked: the broker delivers it again.

Outages. A fire is a pending job-log row before it reaches this class. When the proxy cannot
be reached, jobs stay queued here (and pending in the database), the outage is logged once,
sends are retried with backoff (one job at a time until one goes through), and everything
queued is published when the proxy is back; the return is logged with the outage's length.
A manager stopped meanwhile publishes its pending rows at its next start
(`RunTracker.recover_pending`). A missing topic is not an outage: the run fails with the
`mqadmin updateTopic` command that creates it.
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
from ays_runtime.manager.runs import RunTracker
from ays_runtime.metrics import manager as metrics
from ays_runtime.protocol import JobResultReport
from ays_runtime.registry.base import NodeRef, NodeRegistry
from ays_runtime.retry import Backoff
from ays_runtime.transport import rocketmq_client as mq
from ays_runtime.transport.base import JobDispatch, Transport

log = logging.getLogger("ays.transport.rocketmq")

WINDOW = 64  # sends in flight at once
RESULT_BATCH = 32  # results taken per receive (the proxy's maximum)
RESULT_INVISIBLE = 30  # seconds a taken result stays hidden from other managers
RESULT_AWAIT = 10  # long-poll seconds of one receive


@dataclass(frozen=True)
class _Outgoing:
    job: JobDispatch
    node: NodeRef | None = None  # a broadcast shard's node; None: any node of the group


class RocketMQTransport(Transport):
    def __init__(
        self,
        settings: RocketMQTransportSettings,
        registry: NodeRegistry,
        tracker: RunTracker,
        report_to: str,
        log_dir: str | Path,
        who: str,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.tracker = tracker
        self.report_to = report_to
        self.log_dir = Path(log_dir)
        self.who = who
        self._queue: deque[_Outgoing | JobDispatch] = deque()
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

    async def dispatch(self, jobs: Sequence[JobDispatch]) -> None:
        self._queue.extend(jobs)
        self._wake.set()

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
                batch = [self._queue.popleft() for _ in range(count)]
                outcomes = await asyncio.gather(*(self._publish(item) for item in batch))
                again = [item for item, done in zip(batch, outcomes, strict=True) if not done]
                if not again:
                    backoff.reset()
                    continue
                self._queue.extendleft(reversed(again))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff.next())

    async def _publish(self, item: _Outgoing | JobDispatch) -> bool:
        """Publish one job (a broadcast first becomes its shards); False: try again later."""
        if isinstance(item, JobDispatch):
            job = item
            if not self.registry.healthy_nodes(job.node_group):
                await self.tracker.dispatch_failed(
                    job, f"no healthy node in group {job.node_group}"
                )
                return True
            if not job.is_first_broadcast:
                item = _Outgoing(job)
            else:
                nodes = self.registry.healthy_nodes(job.node_group)
                shards = await self.tracker.claim_shards(job, len(nodes))
                pairs = list(zip(shards, nodes, strict=False))
                outcomes = await asyncio.gather(
                    *(self._publish(_Outgoing(shard, node)) for shard, node in pairs)
                )
                again = [
                    _Outgoing(shard, node)
                    for (shard, node), done in zip(pairs, outcomes, strict=True)
                    if not done
                ]
                self._queue.extend(again)  # shards already claimed: never claimed again
                return True
        job, node = item.job, item.node
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
            await self.tracker.dispatch_failed(job, str(err))
            return True
        self._came_back(sent_at)
        await self.tracker.dispatched(job, node.address if node is not None else "")
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
                await self.tracker.record_result(report)
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
