"""The contract of a dispatch backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


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
