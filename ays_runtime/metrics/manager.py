"""The manager's series (see the package docstring for the rules they keep).

Counted where things happen:

    ays_fires_claimed_total{trigger}             slots (and retries) whose job-log row this
                                                 manager inserted
    ays_fires_misfired_total                     timers found later than misfire_grace (their
                                                 misfire policy applied)
    ays_slots_missed_total{reason}               slots of a schedule not fired, as this manager
                                                 recorded them in the slot ledger: skipped
                                                 (misfire policy skip) or missed (no manager
                                                 was running)
    ays_fire_lateness_seconds{stage}             scheduled time -> claimed, dispatched (handed
                                                 to a node or the broker), stored (recorded
                                                 as dispatched in the job log), started (the
                                                 node's start time); first attempts only
    ays_runs_finished_total{node_group,status}   runs that reached a final status
    ays_run_duration_seconds{node_group}         start to end of finished runs
    ays_task_runs_finished_total{task_id,status} the same per task (metrics.task_labels only)
    ays_transport_errors_total{transport,direction}  publish: a dispatch not handed over;
                                                 consume: results not taken from the broker
    ays_reconcile_duration_seconds               one reconcile (plan, apply)
    ays_reconcile_actions_total{action}          add, update, remove, drop-timer, ...
    ays_purged_rows_total{table}                 rows deleted by the retention purge
    ays_alert_deliveries_total{channel,outcome}  alert notices sent, retried, given up
    ays_alert_rule_errors_total{rule}            checks of a rule that raised (the rule was
                                                 skipped that time; the others went on)
    ays_sign_ins_total{outcome}                  console sign-ins with a password: succeeded,
                                                 failed (wrong name or password), refused
                                                 (locked out: the password was not checked)

Read at scrape time (`StateCollector`, from what `attach` names):

    ays_nodes{node_group,status}                 nodes known, by group and status
    ays_runs_unfinished{status}                  pending (the dispatch backlog, retries
                                                 waiting their backoff included), dispatched,
                                                 running
    ays_tasks{enabled}                           tasks defined
    ays_timers                                   timers installed in this manager's memory
    ays_fire_backlog                             fires waiting for the claim writer
    ays_build_info{version}                      1
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Histogram, Summary
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from ays_runtime import __version__
from ays_runtime.metrics import base
from ays_runtime.metrics.base import DURATION_BUCKETS, LATENESS_BUCKETS
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import JobLog, Node, RunStatus, Task, TriggerKind
from ays_runtime.transport.base import JobDispatch
from ays_runtime.vocabulary import SlotMissReason

log = logging.getLogger("ays.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

FIRES_CLAIMED = Counter(
    "ays_fires_claimed",
    "Job-log rows this manager claimed (a slot fired, a retry, a manual trigger)",
    ["trigger"],
    registry=REGISTRY,
)
FIRES_SUBMITTED = Counter(
    "ays_fires_submitted",
    "Scheduled slots (cron, misfire, catch-up after a handover) this manager sent to be "
    "claimed: one job-log insert tried each. Summed over the managers sharing a database and "
    "divided by the slots fired: the inserts per slot (1 when each task has one owner)",
    registry=REGISTRY,
)
FIRES_MISFIRED = Counter(
    "ays_fires_misfired",
    "Timers found later than misfire_grace; their task's misfire policy applied",
    registry=REGISTRY,
)
SLOTS_MISSED = Counter(
    "ays_slots_missed",
    "Slots of a task's schedule not fired, recorded in the slot ledger by this manager: "
    "skipped (misfire policy skip) or missed (no manager was running)",
    ["reason"],
    registry=REGISTRY,
)
LATENESS = Histogram(
    "ays_fire_lateness_seconds",
    "Seconds from a run's scheduled time to a stage of its first attempt "
    "(claimed, dispatched, stored, started)",
    ["stage"],
    buckets=LATENESS_BUCKETS,
    registry=REGISTRY,
)
RUNS_FINISHED = Counter(
    "ays_runs_finished",
    "Runs that reached a final status, by the node group of their task",
    ["node_group", "status"],
    registry=REGISTRY,
)
RUN_DURATION = Histogram(
    "ays_run_duration_seconds",
    "Seconds from a run's start to its end, by the node group of its task",
    ["node_group"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
TASK_RUNS_FINISHED = Counter(
    "ays_task_runs_finished",
    "Runs that reached a final status, per task (only with metrics.task_labels: true)",
    ["task_id", "status"],
    registry=REGISTRY,
)
TASK_RUN_DURATION = Summary(
    "ays_task_run_duration_seconds",
    "Seconds from a run's start to its end, per task (only with metrics.task_labels: true)",
    ["task_id"],
    registry=REGISTRY,
)
TRANSPORT_ERRORS = Counter(
    "ays_transport_errors",
    "Transport failures: publish (a dispatch not handed over), consume (results not taken)",
    ["transport", "direction"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "ays_reconcile_duration_seconds",
    "Seconds one reconcile of the timer lists took",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
RECONCILE_ACTIONS = Counter(
    "ays_reconcile_actions",
    "Actions reconciles took (add, update, remove, drop-timer, drop-row, misfire, invalid)",
    ["action"],
    registry=REGISTRY,
)
ALERT_RULE_ERRORS = Counter(
    "ays_alert_rule_errors",
    "Checks of an alert rule that raised an error other than the database's (the rule was "
    "skipped that time, the other rules were judged)",
    ["rule"],
    registry=REGISTRY,
)
ALERT_DELIVERIES = Counter(
    "ays_alert_deliveries",
    "Alert notices handed to a channel, by outcome: sent, retry (tried again later), failed "
    "(given up after alerts.max_attempts)",
    ["channel", "outcome"],
    registry=REGISTRY,
)
PURGED_ROWS = Counter(
    "ays_purged_rows",
    "Rows deleted by the retention purge, by table (ays_job_log, ays_audit, ays_slot_miss, "
    "ays_fan_in, ays_fan_in_parent)",
    ["table"],
    registry=REGISTRY,
)
SIGN_INS = Counter(
    "ays_sign_ins",
    "Console sign-ins with a user's password, by outcome: succeeded, failed (wrong name or "
    "password), refused (the name or address was locked out; its password was not checked)",
    ["outcome"],
    registry=REGISTRY,
)

# One thread reads the stored runs for `runs_finished`, in order, off the results' path.
_READER = ThreadPoolExecutor(1, thread_name_prefix="ays-metrics")

# Final statuses whose started_at is the node's own start time (not a dispatch failure).
_RAN = frozenset(
    {
        RunStatus.SUCCEEDED.value,
        RunStatus.FAILED.value,
        RunStatus.TIMED_OUT.value,
        RunStatus.KILLED.value,
    }
)
_UNFINISHED = (RunStatus.PENDING.value, RunStatus.DISPATCHED.value, RunStatus.RUNNING.value)


@dataclass
class _Options:
    task_labels: bool = False
    firing: bool = True  # count and time fires on the firing path (metrics.firing)


OPTIONS = _Options()


def configure(task_labels: bool, firing: bool = True) -> None:
    """The env's choices (metrics.task_labels, metrics.firing); the daemon calls this at
    start-up."""
    OPTIONS.task_labels = task_labels
    OPTIONS.firing = firing


# --- counted where things happen -------------------------------------------------------------


def fires_claimed(dispatches: Sequence[JobDispatch], now: datetime) -> None:
    """`dispatches` were just claimed, at `now` (naive UTC, as the job log stores it)."""
    if not OPTIONS.firing:
        return
    claimed = _STAGES["claimed"]
    for job in dispatches:
        counter = _TRIGGERS.get(job.trigger) or FIRES_CLAIMED.labels(job.trigger)
        counter.inc()
        if job.attempt == 0:
            claimed.observe(_seconds(now - job.scheduled_at))


def slots_not_fired(recorded: Mapping[str, int]) -> None:
    """The claim writer just recorded these slots in the ledger ({reason: slots})."""
    for reason, slots in recorded.items():
        if slots:
            SLOTS_MISSED.labels(reason).inc(slots)


def run_dispatched(job: JobDispatch, stage: str) -> None:
    """`job` reached `stage` ("dispatched": handed over; "stored": recorded) just now."""
    if job.attempt == 0 and OPTIONS.firing:
        _STAGES[stage].observe(_seconds(utcnow() - job.scheduled_at))


def runs_finished(engine: Engine, job_ids: Sequence[int]) -> None:
    """The runs `job_ids` were just stored with a final status: count them by node group and
    status, observe their durations and start lateness. Returns at once: the read they need
    is done by the metrics thread, so the results' commit path never waits for it."""
    if job_ids:
        _READER.submit(count_finished, engine, list(job_ids))


def count_finished(engine: Engine, job_ids: Sequence[int]) -> None:
    """`runs_finished`'s work: one short read of the runs; never raises."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    JobLog.task_id,
                    JobLog.status,
                    JobLog.attempt,
                    JobLog.scheduled_at,
                    JobLog.started_at,
                    JobLog.ended_at,
                    Task.node_group,
                )
                .outerjoin(Task, Task.id == JobLog.task_id)
                .where(JobLog.id.in_(list(job_ids)))
            ).all()
    except SQLAlchemyError as err:
        log.debug("metrics: finished runs not counted: %s", getattr(err, "orig", None) or err)
        return
    for row in rows:
        group = row.node_group or ""
        RUNS_FINISHED.labels(group, row.status).inc()
        duration = None
        if row.started_at is not None and row.ended_at is not None:
            duration = _seconds(row.ended_at - row.started_at)
            RUN_DURATION.labels(group).observe(duration)
        if row.attempt == 0 and row.started_at is not None and row.status in _RAN:
            LATENESS.labels("started").observe(_seconds(row.started_at - row.scheduled_at))
        if OPTIONS.task_labels:
            TASK_RUNS_FINISHED.labels(str(row.task_id), row.status).inc()
            if duration is not None:
                TASK_RUN_DURATION.labels(str(row.task_id)).observe(duration)


def transport_error(transport: str, direction: str, count: int = 1) -> None:
    """`count` failures of `transport` ("http", "rocketmq") to publish or consume."""
    TRANSPORT_ERRORS.labels(transport, direction).inc(count)


def reconciled(seconds: float, actions: Iterable[object]) -> None:
    """A reconcile took `seconds` and took `actions` (each with a `kind`)."""
    RECONCILE_DURATION.observe(seconds)
    for action in actions:
        RECONCILE_ACTIONS.labels(getattr(action, "kind", "other")).inc()


def _seconds(delta: timedelta) -> float:
    return max(delta.total_seconds(), 0.0)


# --- read at scrape time ---------------------------------------------------------------------


@dataclass(frozen=True)
class ManagerState:
    """Where the scrape-time gauges come from: the database, and this process's caches."""

    engine: Engine
    timers: Callable[[], int]  # timers installed in memory
    fire_backlog: Callable[[], int]  # fires waiting for the claim writer


class StateCollector(base.StateCollector[ManagerState]):
    """The manager's gauges of what is, computed at each scrape."""

    def families(self, state: ManagerState) -> Iterable[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "ays_build_info", "Ays version of this manager", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info
        yield base.gauge("ays_timers", "Timers installed in this manager's memory", state.timers())
        yield base.gauge(
            "ays_fire_backlog",
            "Fires submitted but not yet claimed (waiting for the writer)",
            state.fire_backlog(),
        )
        try:
            yield from _database_gauges(state.engine)
        except SQLAlchemyError as err:  # the scrape still answers, without these
            log.debug("metrics: database gauges skipped: %s", getattr(err, "orig", None) or err)


def _database_gauges(engine: Engine) -> list[GaugeMetricFamily]:
    with engine.connect() as conn:
        nodes = conn.execute(
            select(Node.node_group, Node.status, func.count()).group_by(
                Node.node_group, Node.status
            )
        ).all()
        runs = conn.execute(
            select(JobLog.status, func.count())
            .where(JobLog.status.in_(_UNFINISHED))
            .group_by(JobLog.status)
        ).all()
        tasks = conn.execute(select(Task.enabled, func.count()).group_by(Task.enabled)).all()
    nodes_family = GaugeMetricFamily(
        "ays_nodes", "Nodes known, by node group and status", labels=["node_group", "status"]
    )
    for group, status, count in nodes:
        nodes_family.add_metric([group, status], count)
    runs_family = GaugeMetricFamily(
        "ays_runs_unfinished",
        "Runs not final yet: pending (the dispatch backlog, retries waiting included), "
        "dispatched, running",
        labels=["status"],
    )
    counts = dict(runs)
    for status in _UNFINISHED:
        runs_family.add_metric([status], counts.get(status, 0))
    tasks_family = GaugeMetricFamily("ays_tasks", "Tasks defined", labels=["enabled"])
    enabled = {bool(on): count for on, count in tasks}
    for on in (True, False):
        tasks_family.add_metric([str(on).lower()], enabled.get(on, 0))
    return [nodes_family, runs_family, tasks_family]


STATE = StateCollector()
REGISTRY.register(STATE)
# Series that exist from the start at 0, so that rate() sees their first increase; the
# firing path uses these children directly (a label lookup per fire costs more than the count).
_STAGES = {
    stage: LATENESS.labels(stage) for stage in ("claimed", "dispatched", "stored", "started")
}
_TRIGGERS = {trigger.value: FIRES_CLAIMED.labels(trigger.value) for trigger in TriggerKind}
for _table in ("ays_job_log", "ays_audit", "ays_slot_miss", "ays_fan_in", "ays_fan_in_parent"):
    PURGED_ROWS.labels(_table)
for _reason in SlotMissReason:
    SLOTS_MISSED.labels(_reason.value)


def attach(
    state: ManagerState, *, transport: str, task_labels: bool = False, firing: bool = True
) -> None:
    """Name the running manager's state for the scrape-time gauges (the last one wins: a
    process runs one manager), its transport, and the env's choices."""
    STATE.attach(state)
    for direction in ("publish", "consume"):
        TRANSPORT_ERRORS.labels(transport, direction)
    configure(task_labels, firing)
