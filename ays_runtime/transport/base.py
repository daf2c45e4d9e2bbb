"""The contract of a dispatch backend: the manager's side (`Transport`) and the node's side
(`JobSource`, where jobs come from; `ResultSink`, where results go)."""

from __future__ import annotations

import asyncio
import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ays_runtime.protocol import JobResultReport, RunRequest
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
        """A broadcast's first send: the transport claims one shard per healthy node."""
        return (
            self.route_strategy == RouteStrategy.BROADCAST.value
            and self.shard_total == 1
            and self.attempt == 0
        )

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


class Transport(ABC):
    """Hands fired jobs to nodes and brings their results back.

    `dispatch` is called on the manager's event loop with every batch of newly claimed job
    logs. It must return quickly (queue the work, never wait for a job to run) and must not
    raise for a single failed job: a job it cannot deliver is recorded as failed or kept
    pending for a later attempt by the backend itself. Each job-log id is given once.
    """

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect; called once before the first dispatch."""

    @abstractmethod
    async def dispatch(self, jobs: Sequence[JobDispatch]) -> None:
        """Take responsibility for delivering `jobs`."""

    async def stop(self, timeout: float) -> None:  # noqa: B027 - optional hook
        """Finish in-flight deliveries within `timeout` seconds, then disconnect."""


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
