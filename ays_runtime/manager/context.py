"""What the HTTP API needs from the running manager, and nothing more."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.config import EnvConfig
from ays_runtime.manager.output import RunOutput
from ays_runtime.storage.database import utcnow


@dataclass
class ManagerContext:
    config: EnvConfig
    sessions: sessionmaker[Session]
    access_token: str
    manager_id: str
    # Called after the API changed a task: reconciles at once instead of at the next tick.
    on_tasks_changed: Callable[[], Awaitable[None]]
    # Fires a task now, outside its schedule; returns the id of the job log it created.
    trigger_now: Callable[[int, str | None], Awaitable[int]]
    # Ends a run wherever it is (manager/kills.py); (killed, status now, detail).
    kill_run: Callable[[int, str], Awaitable[tuple[bool, str, str]]]
    # A run's output, live from its node or from the job log (manager/output.py).
    run_output: RunOutput
    # Reconciles now (POST /reconcile); the actions it took, one line each.
    reconcile: Callable[[], Awaitable[list[str]]] | None = None
    # Starts and reruns workflows (ays_runtime.workflows.service.WorkflowService).
    workflows: Any = None
    # What managers and nodes present to each other (ays_runtime.auth); "" in tests that
    # have no nodes: only the access token then opens the node routes.
    cluster_secret: str = ""
    version: str = ""
    started_at: datetime = field(default_factory=utcnow)
