"""Judging stored runs against the rules: which notices they raise.

A run counts as an *outcome* of its task once it is final for its slot: it succeeded, or it
failed, timed out or lost its node and no retry follows (its attempt reached the task's
retry_count). Killed runs are an operator's doing, neither failure nor success. Previous
outcomes are read from the job log in slot order (the unique slot index serves the read), so
judging needs no state of its own and gives the same notices on any manager, in any order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, or_, select
from sqlalchemy.exc import SQLAlchemyError

from ays_runtime.alerts.settings import AlertRule, AlertSettings
from ays_runtime.storage.models import JobLog, RunStatus, Task

FAILURES = (RunStatus.FAILED.value, RunStatus.TIMED_OUT.value, RunStatus.NODE_LOST.value)
SUCCESS = RunStatus.SUCCEEDED.value
# An outcome: succeeded, or failed for good (no retry follows).
_IS_OUTCOME = or_(
    JobLog.status == SUCCESS,
    and_(JobLog.status.in_(FAILURES), JobLog.attempt >= Task.retry_count),
)


@dataclass(frozen=True)
class Outcome:
    job_log_id: int
    task_id: int
    task_name: str
    node_group: str
    status: str
    exit_code: int | None
    message: str
    scheduled_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    node: str
    attempt: int = 0

    @property
    def failed(self) -> bool:
        return self.status in FAILURES


@dataclass(frozen=True)
class Raised:
    """A notice a rule raised: queued once per channel under `dedup_key`."""

    dedup_key: str
    rule: AlertRule
    kind: str  # firing or resolved
    summary: str
    document: dict[str, Any]


def outcomes(conn: Connection, job_ids: Sequence[int]) -> list[Outcome]:
    """The outcomes among the runs `job_ids` (others are left out)."""
    rows = conn.execute(
        select(
            JobLog.id,
            JobLog.task_id,
            Task.name,
            Task.node_group,
            JobLog.status,
            JobLog.exit_code,
            JobLog.message,
            JobLog.scheduled_at,
            JobLog.started_at,
            JobLog.ended_at,
            JobLog.node,
            JobLog.attempt,
        )
        .join(Task, Task.id == JobLog.task_id)
        .where(JobLog.id.in_(list(job_ids)), _IS_OUTCOME)
        .order_by(JobLog.scheduled_at)
    ).all()
    return [
        Outcome(
            job_log_id=row.id,
            task_id=row.task_id,
            task_name=row.name,
            node_group=row.node_group,
            status=row.status,
            exit_code=row.exit_code,
            message=row.message,
            scheduled_at=row.scheduled_at,
            started_at=row.started_at,
            ended_at=row.ended_at,
            node=row.node,
            attempt=row.attempt,
        )
        for row in rows
    ]


def previous(conn: Connection, outcome: Outcome, count: int) -> list[str]:
    """The statuses of the task's `count` outcomes before `outcome`'s slot, newest first."""
    rows = conn.execute(
        select(JobLog.status)
        .join(Task, Task.id == JobLog.task_id)
        .where(
            JobLog.task_id == outcome.task_id,
            JobLog.scheduled_at < outcome.scheduled_at,
            _IS_OUTCOME,
        )
        .order_by(JobLog.scheduled_at.desc())
        .limit(count)
    ).scalars()
    return list(rows)


def judge(
    conn: Connection,
    settings: AlertSettings,
    job_ids: Sequence[int],
    now: datetime,
    on_error: Callable[[AlertRule, Exception], None],
) -> list[Raised]:
    """The notices the runs `job_ids`, just stored, raise under `settings.rules` at `now`. A
    rule that raises (not the database) is handed to `on_error`; the others still judge."""
    if not settings.rules or not job_ids:
        return []
    moment = now.replace(tzinfo=UTC)
    raised: list[Raised] = []
    active = [r for r in settings.rules if not r.periodic and not r.silenced(moment)]
    for outcome in outcomes(conn, job_ids):
        rules = [r for r in active if r.watches(outcome.task_name, outcome.node_group)]
        if not rules:
            continue
        depth = max(r.count if r.when == "consecutive_failures" else 1 for r in rules)
        before = _Earlier(conn, outcome, depth)
        for rule in rules:
            try:
                notice = _judge_one(rule, outcome, before)
            except SQLAlchemyError:
                raise  # the database is away: the caller logs it
            except Exception as err:  # a fault of this rule: the other rules still judge
                on_error(rule, err)
                continue
            if notice is not None:
                raised.append(notice)
    return raised


@dataclass
class _Earlier:
    """The task's outcomes before `outcome`, newest first: read once (`depth` of them), when
    a rule first needs them, for every rule judging this outcome."""

    conn: Connection
    outcome: Outcome
    depth: int
    statuses: list[str] | None = None

    def __call__(self, count: int) -> list[str]:
        if self.statuses is None:
            self.statuses = previous(self.conn, self.outcome, self.depth)
        return self.statuses[:count]


def _judge_one(
    rule: AlertRule, outcome: Outcome, previous: Callable[[int], list[str]]
) -> Raised | None:
    task = f"task {outcome.task_name} (id {outcome.task_id})"
    run = f"run {outcome.job_log_id}"
    if rule.when == "started_late":
        # The node's own start time (not a lost run's dispatch); a retry waits by design.
        ran = (SUCCESS, RunStatus.FAILED.value, RunStatus.TIMED_OUT.value)
        if outcome.started_at is None or outcome.status not in ran or outcome.attempt > 0:
            return None
        late = (outcome.started_at - outcome.scheduled_at).total_seconds()
        if late <= rule.seconds:
            return None
        summary = f"{task}: {run} started {late:.3f}s after its scheduled time"
        return _raise(rule, outcome, "firing", f"late:{outcome.job_log_id}", summary)
    if rule.when == "run_failed":
        if outcome.failed:
            why = _why(outcome)
            return _raise(rule, outcome, "firing", f"failed:{outcome.job_log_id}", f"{task} {why}")
        last = previous(1) if rule.recovery else []
        if last and last[0] in FAILURES:
            summary = f"{task} succeeded again ({run})"
            return _raise(rule, outcome, "resolved", f"recovered:{outcome.job_log_id}", summary)
        return None
    # consecutive_failures: once when the streak reaches `count`, resolved when it ends.
    before = previous(rule.count)
    streak_before = next(
        (i for i, status in enumerate(before) if status not in FAILURES), len(before)
    )
    if outcome.failed:
        if streak_before + 1 != rule.count:
            return None
        summary = f"{task} failed {rule.count} runs in a row (the last: {run}, {_why(outcome)})"
        key = f"streak:{outcome.task_id}:{outcome.job_log_id}"
        return _raise(rule, outcome, "firing", key, summary)
    if rule.recovery and streak_before >= rule.count:
        summary = f"{task} succeeded again ({run}) after {rule.count} or more failed runs"
        return _raise(rule, outcome, "resolved", f"recovered:{outcome.job_log_id}", summary)
    return None


def _why(outcome: Outcome) -> str:
    code = f", exit code {outcome.exit_code}" if outcome.exit_code is not None else ""
    message = f": {outcome.message[:200]}" if outcome.message else ""
    return f"{outcome.status.replace('_', ' ')} (run {outcome.job_log_id}{code}){message}"


def _raise(rule: AlertRule, outcome: Outcome, kind: str, key: str, summary: str) -> Raised:
    document = {
        "rule": rule.name,
        "when": rule.when,
        "kind": kind,
        "summary": summary,
        "task": {
            "id": outcome.task_id,
            "name": outcome.task_name,
            "node_group": outcome.node_group,
        },
        "run": {
            "job_log_id": outcome.job_log_id,
            "status": outcome.status,
            "exit_code": outcome.exit_code,
            "message": outcome.message[:1024],
            "node": outcome.node,
            "scheduled_at": _iso(outcome.scheduled_at),
            "started_at": _iso(outcome.started_at),
            "ended_at": _iso(outcome.ended_at),
        },
    }
    return Raised(f"{rule.name}:{key}", rule, kind, summary[:1024], document)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")


def payload(document: dict[str, Any], env: str, manager_id: str, now: datetime) -> str:
    """The JSON text a channel sends: the notice's document with where and when it was made."""
    return json.dumps({**document, "env": env, "manager": manager_id, "raised_at": _iso(now)})
