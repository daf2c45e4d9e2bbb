"""The contract of a dispatch backend: the manager's side (`Transport`: hand runs to a node or
a queue, say what became of each) and the node's side (`JobSource`, where jobs come from;
`ResultSink`, where results go). Routing, broadcast shards and the job log's states are the
manager's (ays_runtime/manager/dispatch.py), never a transport's."""

from __future__ import annotations

import asyncio
import enum
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ays_runtime.protocol import JobResultReport, RunRequest
from ays_runtime.registry.base import NodeRef
from ays_runtime.storage.models import RouteStrategy

if TYPE_CHECKING:
    from ays_runtime.node.daemon import NodeDaemon


@dataclass(frozen=True)
class JobDispatch:
    """One claimed job-log row, with the task as it was when it fired."""

    job_log_id: int
    task_id: int
    task_name: str
    node_group: str
    scheduled_at: datetime
    trigger: str
    attempt: int
    params: str
    task_type: str
    payload: dict[str, Any] = field(default_factory=dict)
    timeout_s: int = 0
    route_strategy: str = "first"
    block_strategy: str = "serial"
    retry_count: int = 0
    retry_backoff: str = "fixed"
    retry_interval_s: float = 10.0
    shard_index: int = 0
    shard_total: int = 1
    parent_results: str = ""  # JSON object by parent name; "" for a task without parents

    @property
    def is_first_broadcast(self) -> bool:
        """A broadcast's first send: the dispatcher claims one shard per healthy node."""
        return (
            self.route_strategy == RouteStrategy.BROADCAST.value
            and self.shard_total == 1
            and self.attempt == 0
        )

    @property
    def queue_if_busy(self) -> bool:
        """Whether a full node queues this run. A failover run asks node after node: a full
        node answers 429 and the next one is asked instead."""
        return self.route_strategy != RouteStrategy.FAILOVER.value

    def run_request(self, report_to: str, queue_if_busy: bool = True) -> RunRequest:
        """What a node is handed for this job, whatever the transport."""
        return RunRequest(
            job_log_id=self.job_log_id,
            task_id=self.task_id,
            task_name=self.task_name,
            task_type=self.task_type,
            payload=self.payload,
            timeout_s=self.timeout_s,
            params=self.params,
            attempt=self.attempt,
            shard_index=self.shard_index,
            shard_total=self.shard_total,
            scheduled_at=self.scheduled_at,
            block_strategy=self.block_strategy,
            queue_if_busy=queue_if_busy,
            report_to=report_to,
            parent_results=self.parent_results,
        )


class Handover(enum.Enum):
    """What became of one run handed to a node or a queue."""

    DELIVERED = "delivered"  # the node (or the queue) took it
    REFUSED = "refused"  # it answered no (busy, stopping, a bad field, a missing topic)
    NOT_REACHED = "not_reached"  # no answer came back (the connection failed, or timed out)
    KEPT = "kept"  # not handed over: the transport is stopping; the row stays pending


@dataclass(frozen=True)
class Handed:
    """One run's `Handover`, with the reason for the log and the run's message when it is
    not DELIVERED ("10.0.0.5:18181: HTTP 429 full", "10.0.0.5:18181: ConnectError ...")."""

    outcome: Handover
    reason: str = ""


@dataclass(frozen=True)
class Destination:
    """Where a batch goes: one node, or (`node` None) the group's queue, where whichever of
    the group's nodes takes a run first runs it."""

    node_group: str
    node: NodeRef | None = None

    @property
    def address(self) -> str:
        """The node's ip:port; empty for the group's queue."""
        return self.node.address if self.node is not None else ""


# What a transport calls with each result it receives itself (RocketMQ's result topic):
# stores it; raises when it could not (the transport then leaves it to come back later).
ResultHandler = Callable[[JobResultReport], Awaitable[object]]


class Transport(ABC):
    """Hands runs to a node or a queue and says what became of each; nothing else.

    The manager's dispatcher (ays_runtime/manager/dispatch.py) decides everything around a
    hand-over: it picks the node (`routes_to_nodes`), claims a broadcast's shards, and
    records each outcome (dispatched, failed with the reason, the next node of a failover).
    A transport never picks a node, never writes the job log and never imports from
    `ays_runtime.manager` (tests/test_code_quality.py checks the imports).

    `hand_over` is called on the manager's event loop, from the dispatcher's own tasks, as
    often and as concurrently as bursts come; it may wait (for the node's answer, for a
    broker outage to end) but must not raise for a run it could not hand over: it answers
    one `Handed` per job, in order. A transport may send a run more than once (e.g. again
    on a fresh connection when the first send provably never reached the node): a node runs
    a job-log id once, whatever arrives (the start compare-and-set, node/claims.py).
    """

    # True: the manager picks each run's node (HTTP). False: runs go to the group's queue
    # and the group's nodes take them (RocketMQ); only a broadcast's shards name a node.
    routes_to_nodes: bool = True
    # Set by the manager before `start` when the transport brings results back itself.
    on_result: ResultHandler | None = None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect; called once before the first hand-over."""

    @abstractmethod
    async def hand_over(self, to: Destination, jobs: Sequence[JobDispatch]) -> list[Handed]:
        """Hand `jobs` to `to`; one outcome per job, in order."""

    async def stop(self, timeout: float) -> None:  # noqa: B027 - optional hook
        """Finish hand-overs in flight within `timeout` seconds (what is left answers KEPT,
        and so does every later `hand_over`), then disconnect."""


# --- the node's side ------------------------------------------------------------------------


class Delivery(enum.Enum):
    """What became of one attempt to hand a result over."""

    TAKEN = "taken"
    RETRY = "retry"  # not now: keep it and try again
    REFUSED = "refused"  # never: it can never be taken


class ResultSink(ABC):
    """Where a node's results go: the manager's API (built-in) or a result topic (RocketMQ).

    The node keeps every result in its spool until `deliver` says TAKEN (or REFUSED), and
    calls `deliver` again, with backoff, after RETRY: `deliver` must be safe to repeat (the
    manager stores a run's first final result and ignores the others). It must not raise.
    """

    @abstractmethod
    def destination(self, report_to: str) -> str:
        """Where results of a run whose manager is `report_to` go (for log lines; results
        to one destination are retried in order)."""

    @abstractmethod
    async def deliver(self, report: JobResultReport, report_to: str) -> tuple[Delivery, str]:
        """Hand one result over; the outcome and a short reason for the log."""

    async def deliver_many(
        self, items: Sequence[tuple[JobResultReport, str]]
    ) -> list[tuple[Delivery, str]]:
        """Hand several results over ((report, report_to) each); an outcome per item, in
        order. A sink with a batch form overrides this; here each goes on its own."""
        return list(await asyncio.gather(*(self.deliver(r, to) for r, to in items)))


class JobSource(ABC):
    """Where a node's jobs come from besides its HTTP API (which every node serves).

    `start` begins taking jobs and handing them to `node.accept`; it returns once taking has
    begun (a source that cannot reach its server yet keeps trying in the background).
    `stop` stops taking new jobs; jobs already handed over finish and report as usual.
    """

    @abstractmethod
    async def start(self, node: NodeDaemon) -> None:
        """Begin taking jobs for `node`."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop taking jobs (time-boxed by the source itself)."""

    async def dropped(self, job_log_id: int) -> None:  # noqa: B027 - optional hook
        """A run this source handed over will not run here and has no result: another node
        holds it, or it has ended (its start claim lost). Settle it as done (e.g. ack)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, after the node's last result was delivered."""
