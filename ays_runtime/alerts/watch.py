"""The rules judged by looking at the state every `alerts.watch_interval` seconds:
`running_longer_than`, `node_offline`, `group_unhealthy` and `slot_missed`.

A long run raises one notice (keyed by the run). A range of slots not fired (the slot ledger,
`ays_slot_miss`) raises one notice, keyed by the range's row, when it was recorded lately
(within RECENT_MISSES, or three looks): a restart does not raise old ranges again. A node
or a group is an *episode*: it opens when the subject goes bad (firing) and closes when it is
good again (resolved), one notice each. Open episodes are kept in memory and, at start, read
back from the queue of notices (the latest notice of a subject says whether its episode is
open), so a restart neither repeats a firing nor forgets a resolved. Episode keys count the
subject's firings: two managers opening the same episode queue it once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.exc import SQLAlchemyError

from ays_runtime.alerts.rules import Raised
from ays_runtime.alerts.settings import AlertRule, AlertSettings
from ays_runtime.storage.models import (
    AlertDelivery,
    JobLog,
    Node,
    NodeStatus,
    RunStatus,
    SlotMiss,
    Task,
)
from ays_runtime.vocabulary import SlotMissReason

LONG_RUN_LIMIT = 500  # long runs looked at per rule and look
MISS_LIMIT = 500  # slot-ledger ranges looked at per rule and look
RECENT_MISSES = timedelta(minutes=1)
_RUNNING = (RunStatus.DISPATCHED.value, RunStatus.RUNNING.value)


@dataclass
class Watcher:
    settings: AlertSettings
    # (rule, subject) -> the key of its open episode's firing notice
    open: dict[tuple[str, str], str] = field(default_factory=dict)
    long_runs: set[str] = field(default_factory=set)  # keys of long runs already raised
    misses: set[str] = field(default_factory=set)  # keys of recent ranges already raised
    _loaded: bool = False

    def look(
        self, conn: Connection, now: datetime, on_error: Callable[[AlertRule, Exception], None]
    ) -> list[Raised]:
        """The notices the state raises now. A rule whose check raises (not the database)
        is handed to `on_error` and skipped this time; the other rules are judged."""
        if not self._loaded:
            self._load_open(conn)
            self._loaded = True
        moment = now.replace(tzinfo=UTC)
        raised: list[Raised] = []
        long_runs: set[str] = set()
        misses: set[str] = set()
        recent = now - max(RECENT_MISSES, timedelta(seconds=3 * self.settings.watch_interval))
        for rule in self.settings.rules:
            if not rule.periodic or rule.silenced(moment):
                continue
            try:
                if rule.when == "running_longer_than":
                    found = _long_runs(conn, rule, now)
                    long_runs |= {r.dedup_key for r in found}
                    raised += [r for r in found if r.dedup_key not in self.long_runs]
                elif rule.when == "slot_missed":
                    found = _slot_misses(conn, rule, recent)
                    misses |= {r.dedup_key for r in found}
                    raised += [r for r in found if r.dedup_key not in self.misses]
                else:
                    bad = _bad_subjects(conn, rule)
                    raised += self._episodes(conn, rule, bad)
            except SQLAlchemyError:
                raise  # the database is away: the caller waits for the next look
            except Exception as err:  # a fault of this rule's check: the others go on
                on_error(rule, err)
        self.long_runs = long_runs  # the ones still running: a run that ended is forgotten
        self.misses = misses  # the ones still recent
        return raised

    def _episodes(self, conn: Connection, rule: AlertRule, bad: dict[str, str]) -> list[Raised]:
        raised = []
        for subject, summary in bad.items():
            if (rule.name, subject) in self.open:
                continue
            n = _firings(conn, rule.name, subject) + 1
            key = f"{rule.name}:{subject}:{n}"
            self.open[(rule.name, subject)] = key
            document = _document(rule, subject, summary, "firing")
            raised.append(Raised(key, rule, "firing", summary, document))
        for (name, subject), key in list(self.open.items()):
            if name == rule.name and subject not in bad:
                del self.open[(name, subject)]
                if rule.recovery:
                    summary = f"{subject} is healthy again"
                    document = _document(rule, subject, summary, "resolved")
                    raised.append(Raised(f"{key}:resolved", rule, "resolved", summary, document))
        return raised

    def _load_open(self, conn: Connection) -> None:
        names = [r.name for r in self.settings.rules if r.episodic]
        if not names:
            return
        latest = (
            select(func.max(AlertDelivery.id))
            .where(AlertDelivery.rule.in_(names), AlertDelivery.kind.in_(("firing", "resolved")))
            .group_by(AlertDelivery.dedup_key)
        )
        rows = conn.execute(
            select(AlertDelivery.rule, AlertDelivery.dedup_key, AlertDelivery.kind)
            .where(AlertDelivery.id.in_(latest))
            .order_by(AlertDelivery.id)
        ).all()
        for rule, key, kind in rows:
            subject = key[len(rule) + 1 :].removesuffix(":resolved").rsplit(":", 1)[0]
            if kind == "firing":
                self.open[(rule, subject)] = key
            else:
                self.open.pop((rule, subject), None)


def _bad_subjects(conn: Connection, rule: AlertRule) -> dict[str, str]:
    """Subject -> summary, for the nodes or groups `rule` finds bad now."""
    groups = set(rule.node_groups)
    if rule.when == "node_offline":
        rows = conn.execute(
            select(Node.ip, Node.port, Node.node_group, Node.last_seen).where(
                Node.status == NodeStatus.OFFLINE.value
            )
        ).all()
        return {
            f"node {ip}:{port}": f"node {ip}:{port} of group {group} is offline"
            + (f" (last seen {_iso(seen)})" if seen is not None else "")
            for ip, port, group, seen in rows
            if not groups or group in groups
        }
    used = set(
        conn.execute(select(Task.node_group).where(Task.enabled.is_(True)).distinct()).scalars()
    )
    online = set(
        conn.execute(
            select(Node.node_group).where(Node.status == NodeStatus.ONLINE.value).distinct()
        ).scalars()
    )
    return {
        f"group {group}": f"node group {group} has enabled tasks and no online node"
        for group in sorted(used - online)
        if not groups or group in groups
    }


def _long_runs(conn: Connection, rule: AlertRule, now: datetime) -> list[Raised]:
    limit = now - timedelta(seconds=rule.seconds)
    query = (
        select(
            JobLog.id, JobLog.task_id, JobLog.node, JobLog.started_at, Task.name, Task.node_group
        )
        .join(Task, Task.id == JobLog.task_id)
        .where(JobLog.status.in_(_RUNNING), JobLog.started_at.is_not(None))
        .order_by(JobLog.started_at)
        .limit(LONG_RUN_LIMIT)
    )
    if rule.factor is None:  # only the fixed limit: the database picks the runs
        query = query.where(JobLog.started_at < limit)
    usual: dict[int, float | None] = {}
    raised = []
    for job_id, task_id, node, started, name, group in conn.execute(query).all():
        if started is None or not rule.watches(name, group):
            continue
        if started < limit:
            why = f"longer than {rule.seconds:g}s"
        else:
            assert rule.factor is not None
            if task_id not in usual:
                usual[task_id] = usual_duration(conn, task_id, rule.history)
            p95 = usual[task_id]
            took = (now - started).total_seconds()
            if p95 is None or took <= p95 * rule.factor:
                continue
            why = (
                f"{took:.1f}s, longer than {rule.factor:g} x its usual {p95:.3f}s "
                f"(p95 of its last {rule.history} successful runs)"
            )
        summary = (
            f"run {job_id} of task {name} (id {task_id}) has run {why} "
            f"(since {_iso(started)} on {node or 'a node'})"
        )
        document = _document(rule, f"run {job_id}", summary, "firing")
        document["task"] = {"id": task_id, "name": name, "node_group": group}
        raised.append(Raised(f"{rule.name}:run:{job_id}", rule, "firing", summary, document))
    return raised


USUAL_MIN_RUNS = 3  # fewer successful runs than this: no usual duration yet


def usual_duration(conn: Connection, task_id: int, history: int) -> float | None:
    """The p95 of the durations (seconds, start to end) of the task's last `history`
    successful runs; None with fewer than USUAL_MIN_RUNS of them."""
    rows = conn.execute(
        select(JobLog.started_at, JobLog.ended_at)
        .where(
            JobLog.task_id == task_id,
            JobLog.status == RunStatus.SUCCEEDED.value,
            JobLog.started_at.is_not(None),
            JobLog.ended_at.is_not(None),
        )
        .order_by(JobLog.scheduled_at.desc())
        .limit(history)
    ).all()
    durations = sorted(
        max((end - start).total_seconds(), 0.0)
        for start, end in rows
        if start is not None and end is not None
    )
    if len(durations) < USUAL_MIN_RUNS:
        return None
    # nearest rank: the smallest duration at or above 95% of the runs
    return durations[min(len(durations) - 1, -(-95 * len(durations) // 100) - 1)]


def _slot_misses(conn: Connection, rule: AlertRule, since: datetime) -> list[Raised]:
    rows = conn.execute(
        select(
            SlotMiss.id,
            SlotMiss.task_id,
            SlotMiss.first_at,
            SlotMiss.end_at,
            SlotMiss.slot_count,
            SlotMiss.reason,
            SlotMiss.manager_id,
            Task.name,
            Task.node_group,
        )
        .join(Task, Task.id == SlotMiss.task_id)
        .where(SlotMiss.recorded_at >= since)
        .order_by(SlotMiss.id)
        .limit(MISS_LIMIT)
    ).all()
    raised = []
    for miss in rows:
        name, group = miss.name, miss.node_group
        if not rule.watches(name, group):
            continue
        why = _WHY.get(miss.reason, miss.reason)
        summary = (
            f"{miss.slot_count} slot(s) of task {name} (id {miss.task_id}) {why}, from "
            f"{_iso(miss.first_at)} until {_iso(miss.end_at)}"
        )
        document = _document(rule, f"task {miss.task_id}", summary, "firing")
        document["task"] = {"id": miss.task_id, "name": name, "node_group": group}
        document["slots"] = {
            "reason": miss.reason,
            "first_at": _iso(miss.first_at),
            "end_at": _iso(miss.end_at),
            "count": miss.slot_count,
            "found_by": miss.manager_id,
        }
        raised.append(Raised(f"{rule.name}:slots:{miss.id}", rule, "firing", summary, document))
    return raised


_WHY = {
    SlotMissReason.MISSED.value: "not fired (no manager was running)",
    SlotMissReason.SKIPPED.value: "skipped by the misfire policy (a manager found them late)",
}


def _firings(conn: Connection, rule: str, subject: str) -> int:
    prefix = f"{rule}:{subject}:".replace("%", r"\%").replace("_", r"\_")
    count = conn.execute(
        select(func.count(func.distinct(AlertDelivery.dedup_key))).where(
            AlertDelivery.rule == rule,
            AlertDelivery.kind == "firing",
            AlertDelivery.dedup_key.like(prefix + "%", escape="\\"),
        )
    ).scalar()
    return int(count or 0)


def _document(rule: AlertRule, subject: str, summary: str, kind: str) -> dict[str, Any]:
    return {
        "rule": rule.name,
        "when": rule.when,
        "kind": kind,
        "subject": subject,
        "summary": summary,
    }


def _iso(moment: datetime | None) -> str:
    return "" if moment is None else moment.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")
