"""The RocketMQ transport, node side: jobs from the group's topics, results to the result topic.

Jobs. The node consumes `<topic_prefix><group>` with the group's consumer group (each job is
taken by one node of the group) and `<topic_prefix><group>_bcast` with a consumer group of its
own filtered on its own tag (the broadcast shards addressed to it). It receives from the group
topic only while it holds fewer than `node.max_concurrent_jobs` of that topic's jobs, so a busy
node leaves jobs to the others. A received message is hidden for RECEIVE_INVISIBLE seconds;
once the job is accepted its invisible duration becomes the task's timeout + INVISIBLE_GRACE
(DEFAULT_INVISIBLE for a task without a timeout), and it is extended again whenever a third
of that is left, for as long as the run is held (waiting its turn or running).

Results. The result is spooled (`node/spool.py`), published to `result_topic` (key = job-log id,
tag = status), and only then is the job's message acked. A result that cannot be published
stays in the spool and is retried; the message, still unacked, keeps being extended while
the node lives.

At-least-once in, exactly-once effect. A message can come again: after a node died holding
it (its invisible time ran out), after a node that published the result died before acking,
or as a duplicate. The node never runs a job-log id twice:
  * held here (waiting or running): a redelivery replaces the old handle, a second copy
    (delivery attempt 1: a send repeated after its answer was lost) is acked; not run;
  * finished here: its result, still spooled or delivered lately, is published again and the
    message acked; not run;
  * new here but delivered before (delivery attempt > 1), or a broadcast shard: the node asks
    the manager (`GET /api/v1/job-logs/{id}`); a run that is final there is acked, not run;
  * and on any node, whatever the delivery: a run starts only once the manager has recorded
    that this node runs it (the start claim, node/claims.py). A copy whose claim loses (a
    duplicate of a send whose answer was lost, a redelivery after its node died or was cut
    off) is acked and not run. A run whose node died is ended `node_lost` by the registry
    and retried per the task's policy, as with the built-in transport.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import pydantic

from ays_runtime.auth import auth_headers
from ays_runtime.config import EnvConfig
from ays_runtime.exceptions import TransientTransportError, TransportError
from ays_runtime.metrics import node as node_metrics
from ays_runtime.node.app import JobRefused
from ays_runtime.node.spool import SpooledResult
from ays_runtime.protocol import API, JobResultReport, RunRequest
from ays_runtime.retry import Backoff
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import RunStatus
from ays_runtime.transport import rocketmq_client as mq
from ays_runtime.transport.base import Delivery, JobSource, ResultSink

if TYPE_CHECKING:
    from ays_runtime.node.daemon import NodeDaemon

log = logging.getLogger("ays.node.rocketmq")

RECEIVE_INVISIBLE = 30  # seconds a received message is hidden before its run is accepted
INVISIBLE_GRACE = 10  # seconds beyond the task's timeout
DEFAULT_INVISIBLE = 120  # seconds, for a task without a timeout
MAX_INVISIBLE = 12 * 3600  # the proxy's maximum
MIN_INVISIBLE = 10  # the proxy's minimum for a receive
RENEW_LEFT = 1 / 3  # extend when this share of the invisible duration is left
RENEW_TICK = 1.0
RELEASE_AFTER = 1  # seconds: a message the node gives back is visible again this soon
RECEIVE_AWAIT = 10  # long-poll seconds of one receive
MAX_BATCH = 16
CHECK_TIMEOUT = httpx.Timeout(5.0, connect=3.0)


@dataclass
class _Held:
    """The message of a run this node holds, until its result is published."""

    message: Any
    receiver: mq.Receiver
    duration: int
    hidden_until: float  # time.monotonic() when the broker shows it again, as last set
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    lost: bool = False  # its invisible time ran out: the broker may hand it to another node


def invisible_duration(request: RunRequest) -> int:
    """How long a run's message stays hidden, from its task's timeout."""
    if request.timeout_s and request.timeout_s > 0:
        seconds = int(request.timeout_s) + INVISIBLE_GRACE
        return max(MIN_INVISIBLE, min(MAX_INVISIBLE, seconds))
    return DEFAULT_INVISIBLE


class RocketMQNodeTransport(JobSource, ResultSink):
    def __init__(
        self,
        config: EnvConfig,
        group: str,
        address: str,
        client: httpx.AsyncClient,
        token: str,
    ) -> None:
        settings = config.transport
        assert settings.backend == "rocketmq"
        self.settings = settings
        self.who = f"node {address}"
        mq.check_names(settings, group, f"node {address}")
        self.log_dir = config.node.log_dir
        self.capacity = config.node.max_concurrent_jobs
        self._client = client
        self._token = token
        self._jobs = mq.Receiver(
            settings,
            mq.group_consumer(settings, group),
            mq.group_topic(settings, group),
            await_duration=RECEIVE_AWAIT,
            who=self.who,
        )
        self._shards = mq.Receiver(
            settings,
            mq.node_consumer(settings, group, address),
            mq.broadcast_topic(settings, group),
            tag=mq.node_tag(address),
            await_duration=RECEIVE_AWAIT,
            who=self.who,
        )
        self._publisher = mq.Publisher(settings, self.who, threads=4)
        self._held: dict[int, _Held] = {}
        self._node: NodeDaemon | None = None
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._receive_pool = concurrent.futures.ThreadPoolExecutor(
            2, thread_name_prefix="ays-mq-receive"
        )
        self._op_pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="ays-mq-op")
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._starting = asyncio.Lock()

    # --- JobSource ------------------------------------------------------------------------

    async def start(self, node: NodeDaemon) -> None:
        self._node = node
        await self._ensure_publisher()
        self._tasks = [
            asyncio.create_task(self._receive_loop(self._jobs, gated=True), name="ays-mq-jobs"),
            asyncio.create_task(self._receive_loop(self._shards, gated=False), name="ays-mq-bc"),
            asyncio.create_task(self._renew_loop(), name="ays-mq-renew"),
        ]
        log.info(
            "%s: taking jobs from RocketMQ topics %s and %s (consumer groups %s, %s)",
            self.who,
            self._jobs.topic,
            self._shards.topic,
            self._jobs.group,
            self._shards.group,
        )

    async def _ensure_publisher(self) -> None:
        # The result sink may be used before start() (results spooled by an earlier run).
        async with self._starting:
            if not self._started:
                await asyncio.to_thread(mq.load_client, self.log_dir, self.who)
                await self._publisher.start()
                self._started = True

    async def stop(self) -> None:
        """Stop taking jobs; held runs keep their messages hidden until close()."""
        self._stopping.set()
        self._slot_freed.set()

    async def close(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        # Closing the consumers ends a long poll in flight; the publisher goes last.
        await asyncio.gather(
            asyncio.to_thread(self._jobs.close),
            asyncio.to_thread(self._shards.close),
        )
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._held:
            log.info(
                "%s: %d job message(s) not acked: the broker hands them out again",
                self.who,
                len(self._held),
            )
        await self._publisher.close()
        self._receive_pool.shutdown(wait=True, cancel_futures=True)
        self._op_pool.shutdown(wait=True, cancel_futures=True)

    async def dropped(self, job_log_id: int) -> None:
        """A copy whose start claim lost: ack it, the run is another node's (or ended)."""
        await self._settle(job_log_id)

    # --- ResultSink -----------------------------------------------------------------------

    def destination(self, report_to: str) -> str:
        return f"RocketMQ topic {self.settings.result_topic}"

    async def deliver(self, report: JobResultReport, report_to: str) -> tuple[Delivery, str]:
        await self._ensure_publisher()
        try:
            await self._publisher.send(
                self.settings.result_topic,
                report.model_dump_json().encode(),
                key=str(report.job_log_id),
                tag=report.status,
            )
        except TransportError as err:  # even a missing topic: keep it until one is created
            node_metrics.TRANSPORT_ERRORS.labels("publish").inc()
            return Delivery.RETRY, str(err)
        await self._settle(report.job_log_id)
        return Delivery.TAKEN, "published"

    async def _settle(self, job_log_id: int) -> None:
        """The run's result is published: ack its message."""
        held = self._held.pop(job_log_id, None)
        if held is None:
            return
        self._slot_freed.set()
        async with held.lock:
            if held.lost:
                return
            try:
                await self._in_pool(held.receiver.ack, held.message)
            except TransportError as err:  # redelivered later: then acked as a duplicate
                log.warning("%s: run %d: its message was not acked: %s", self.who, job_log_id, err)

    # --- taking jobs ------------------------------------------------------------------------

    async def _receive_loop(self, receiver: mq.Receiver, *, gated: bool) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(first=1.0, cap=5.0)
        failing_since: float | None = None
        while not self._stopping.is_set():
            count = MAX_BATCH
            if gated:
                count = min(MAX_BATCH, self.capacity - self._holding(receiver))
                if count <= 0:
                    self._slot_freed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._slot_freed.wait(), RENEW_TICK)
                    continue
            try:
                messages = await loop.run_in_executor(
                    self._receive_pool, receiver.receive, count, RECEIVE_INVISIBLE
                )
            except TransportError as err:
                if self._stopping.is_set():
                    return
                node_metrics.TRANSPORT_ERRORS.labels("consume").inc()
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning(
                        "%s: cannot take jobs from %s (%s); retrying", self.who, receiver.topic, err
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff.next())
                continue
            if failing_since is not None:
                log.info(
                    "%s: jobs flow again from %s after %.1fs",
                    self.who,
                    receiver.topic,
                    time.monotonic() - failing_since,
                )
                failing_since = None
            backoff.reset()
            for message in messages:
                await self._take(message, receiver)

    def _holding(self, receiver: mq.Receiver) -> int:
        return sum(1 for held in self._held.values() if held.receiver is receiver)

    async def _take(self, message: Any, receiver: mq.Receiver) -> None:
        node = self._node
        assert node is not None
        try:
            request = RunRequest.model_validate_json(message.body)
        except pydantic.ValidationError as err:
            log.error(
                "%s: message %s on %s is not a job (%s): dropped",
                self.who,
                message.message_id,
                receiver.topic,
                str(err).splitlines()[0],
            )
            await self._ack_quietly(receiver, message)
            return
        job_log_id = request.job_log_id
        if self._stopping.is_set() or node.stopping:
            await self._release(receiver, message)
            return
        held = self._held.get(job_log_id)
        if held is not None and (message.delivery_attempt or 1) == 1:
            # Not the held message come back (that has a higher delivery attempt) but a second
            # copy of the run (a send the client repeated after its answer was lost): the run
            # is in hand here, so the copy is acked at once.
            log.info(
                "%s: run %d: a second copy of it arrived: acked, not run", self.who, job_log_id
            )
            await self._ack_quietly(receiver, message)
            return
        if held is not None:
            log.info(
                "%s: run %d delivered again while held here: not run again", self.who, job_log_id
            )
            async with held.lock:
                held.message, held.receiver, held.lost = message, receiver, False
                held.hidden_until = time.monotonic() + RECEIVE_INVISIBLE
            return
        if node.knows(job_log_id):
            await self._already_ran(job_log_id, message, receiver)
            return
        redelivered = (message.delivery_attempt or 1) > 1
        if (redelivered or receiver is self._shards) and await self._final_at_manager(request):
            log.info(
                "%s: run %d is already finished at the manager: not run again",
                self.who,
                job_log_id,
            )
            await self._ack_quietly(receiver, message)
            return
        duration = invisible_duration(request)
        held = _Held(message, receiver, duration, time.monotonic() + RECEIVE_INVISIBLE)
        self._held[job_log_id] = held
        try:
            node.accept(request)
        except JobRefused as refused:
            if refused.status_code in (429, 503):  # full or stopping: another node may take it
                self._held.pop(job_log_id, None)
                await self._release(receiver, message)
                return
            # A job no node can run (a field it cannot use): fail it, with its reason.
            report = _refused(request, refused, node.address)
            await node.reporter.report(SpooledResult(request.report_to, report))
            return
        await self._extend(job_log_id, held)

    async def _already_ran(self, job_log_id: int, message: Any, receiver: mq.Receiver) -> None:
        node = self._node
        assert node is not None
        held = _Held(message, receiver, RECEIVE_INVISIBLE, time.monotonic() + RECEIVE_INVISIBLE)
        if job_log_id in node.reporter:  # result spooled, not published yet: ack after it is
            self._held[job_log_id] = held
            node.reporter.retry_now()
            return
        entry = node.reporter.delivered(job_log_id)
        if entry is not None:
            log.info(
                "%s: run %d delivered again: publishing its result again", self.who, job_log_id
            )
            self._held[job_log_id] = held
            await node.reporter.report(entry)
            return
        log.info("%s: run %d already ran here: not run again", self.who, job_log_id)
        await self._ack_quietly(receiver, message)

    async def _final_at_manager(self, request: RunRequest) -> bool:
        url = f"{request.report_to.rstrip('/')}{API}/job-logs/{request.job_log_id}"
        try:
            response = await self._client.get(
                url, headers=auth_headers(self._token), timeout=CHECK_TIMEOUT
            )
        except httpx.HTTPError as err:
            log.warning(
                "%s: run %d came again and the manager cannot say whether it already ran "
                "(%s): running it",
                self.who,
                request.job_log_id,
                type(err).__name__,
            )
            return False
        if response.status_code == 404:
            return True  # purged long ago, or never existed: nothing to run for
        if response.status_code != 200:
            return False
        try:
            return RunStatus(response.json()["status"]).is_final
        except (ValueError, KeyError, TypeError):
            return False

    # --- invisibility -----------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(RENEW_TICK)
            now = time.monotonic()
            due = [
                (job_log_id, held)
                for job_log_id, held in list(self._held.items())
                if not held.lost and held.hidden_until - now < held.duration * RENEW_LEFT
            ]
            await asyncio.gather(*(self._extend(i, h) for i, h in due))

    async def _extend(self, job_log_id: int, held: _Held) -> None:
        async with held.lock:
            if held.lost or self._held.get(job_log_id) is not held:
                return
            asked = time.monotonic()
            try:
                await self._in_pool(held.receiver.change_invisible, held.message, held.duration)
            except TransientTransportError as err:
                log.debug("%s: run %d: not extended now: %s", self.who, job_log_id, err)
                return
            except TransportError as err:
                held.lost = True
                log.warning(
                    "%s: run %d: its message could not be kept hidden (%s); the broker may "
                    "hand it to another node",
                    self.who,
                    job_log_id,
                    err,
                )
                return
            held.hidden_until = asked + held.duration

    async def _release(self, receiver: mq.Receiver, message: Any) -> None:
        """Give a message back: visible to the group again in RELEASE_AFTER seconds."""
        with contextlib.suppress(TransportError):
            await self._in_pool(receiver.change_invisible, message, RELEASE_AFTER)

    async def _ack_quietly(self, receiver: mq.Receiver, message: Any) -> None:
        try:
            await self._in_pool(receiver.ack, message)
        except TransportError as err:
            log.debug("%s: message %s not acked: %s", self.who, message.message_id, err)

    async def _in_pool(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._op_pool, fn, *args)


def _refused(request: RunRequest, refused: JobRefused, address: str) -> JobResultReport:
    return JobResultReport(
        job_log_id=request.job_log_id,
        node=address,
        status=RunStatus.FAILED.value,
        ended_at=utcnow(),
        message=f"not run: {refused}",
    )
