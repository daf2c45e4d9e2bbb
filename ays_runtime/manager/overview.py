"""The dashboard's figures, in a handful of indexed queries (the console's dashboard and
`GET /api/v1/overview` both read them from here).

Contract (stable; the console builds on it):

    overview(session, *, now=None, manager_silent_after=timedelta(seconds=60),
             failures=10, running=20) -> Overview
    keep_warm(sessions, stop)   the manager's task: reads the day's minutes at start, then
                                the new ones each minute, before a dashboard asks for them
    warm(sessions, now=None)    one such round (what keep_warm runs in a thread)

`Overview` is a pydantic model (its date-times are aware, in UTC; JSON sends them with `Z`):

    generated_at          when the figures were taken
    nodes                 [GroupNodes(node_group, online, offline, unknown)], every node group
                          (those without nodes too) and any group only nodes name, by name
    last_hour, last_day   RunCounts(since, total, by_status {status: n}, finished, succeeded,
                          success_rate 0..1 or None): the runs (job-log rows, retries included)
                          created in the last 60 / 1440 whole minutes, the current one
                          included; success_rate is succeeded over the runs that ended
                          (skipped and discarded left out)
    timeline              Timeline(start, step_s=60, fires [n per minute],
                          p99_lateness_s [s or None per minute]) over the 24 h before the
                          current minute's end: 1440 points, oldest first
    going                 Going(pending, dispatched, running, runs [GoingRun ...]): the counts of
                          unfinished runs and the newest `running` of them that a node holds
    recent_failures       [RecentFailure(id, task_id, task_name, status, scheduled_at,
                          created_at, ended_at, node, message)], newest first, at most `failures`
    managers              [ManagerAlive(manager_id, version, started_at, last_seen, alive,
                          stopped_at, tasks_owned)] (managers(session, now, silent_after)):
                          alive when not stopped and last seen within `manager_silent_after`;
                          tasks_owned: the timers an alive one holds (its share of the
                          enabled tasks, scheduler/ownership.py), 0 for the others

A *fire* is a slot claim: a job-log row of a cron or misfire trigger, attempt 0, shard 0.
Its lateness is `created_at - scheduled_at`: from the slot's time to the moment a manager
claimed it, which is when it was fired (the dispatch follows in the same batch). The p99 of a
minute is computed in the database from a histogram (LATENESS_BOUNDS_S): the largest lateness
in the bucket holding the 99th percentile, so it is never below the true p99 and never above
that bucket's bound, to the millisecond (SQLite's julianday arithmetic is no finer).

The day's figures are read per minute of `created_at`; a minute over SETTLE (2 min) old with
no unfinished run is kept in this process (per database) and never read again, so a dashboard
reloaded every few seconds reads only its last minutes. Reading the whole day takes about
0.5-1.3 s with 1M rows over a week (bench/console_pages_bench.py), so no page load does it:
`keep_warm`, started with the manager, reads it in a thread at start and the minutes that
settle at each new minute (a few rows). One database's minutes are read by one caller at a
time: a load arriving while the start's read runs waits for it, then reads only what is left.
This holds while rows are created with the claiming manager's clock (a peer whose clock is
minutes behind would add to minutes already kept) and a run that ended keeps its status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import ColumnElement, and_, case, func, literal_column, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import JobLog, Manager, Node, NodeGroup, Task, TimerRow
from ays_runtime.vocabulary import NodeStatus, RunStatus, TriggerKind
from ays_runtime.web.fields import UtcOut

TIMELINE_MINUTES = 24 * 60
# Upper bounds (seconds) of the lateness histogram's buckets; one more bucket holds the rest.
LATENESS_BOUNDS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
FAILED = (RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.NODE_LOST)
UNFINISHED = (RunStatus.PENDING, RunStatus.DISPATCHED, RunStatus.RUNNING)
NOT_RUN = (RunStatus.SKIPPED, RunStatus.DISCARDED)
FIRE_TRIGGERS = (TriggerKind.CRON.value, TriggerKind.MISFIRE.value)
# A minute this long past is settled: no row will be created in it any more (created_at is
# the clock of the manager claiming, now), so once no run of it is unfinished its figures are
# kept in memory, per database, and not read again (runs that ended stay ended).
SETTLE = timedelta(minutes=2)
MAX_RANGES = 20  # minutes to read, as ranges in one statement; more: one range over them all
# keep_warm reads this long after each minute starts (the minute SETTLE ago has just settled).
WARM_AFTER_S = 1.0

log = logging.getLogger("ays.manager.overview")


class GroupNodes(BaseModel):
    node_group: str
    online: int = 0
    offline: int = 0
    unknown: int = 0


class RunCounts(BaseModel):
    since: UtcOut
    total: int
    by_status: dict[str, int] = Field(description="every run status, 0 included")
    finished: int = Field(description="runs that ended, skipped and discarded left out")
    succeeded: int
    success_rate: float | None = Field(description="succeeded / finished; null: none finished")


class Timeline(BaseModel):
    start: UtcOut = Field(description="the first minute's start")
    step_s: int = 60
    fires: list[int] = Field(description="slots fired per minute, oldest first")
    p99_lateness_s: list[float | None] = Field(
        description="p99 of (claimed at - scheduled at) per minute; null: no fire"
    )


class GoingRun(BaseModel):
    id: int
    task_id: int
    task_name: str | None
    status: str
    node: str
    scheduled_at: UtcOut
    started_at: UtcOut | None


class Going(BaseModel):
    pending: int
    dispatched: int
    running: int
    runs: list[GoingRun] = Field(description="the newest running or dispatched runs")


class RecentFailure(BaseModel):
    id: int
    task_id: int
    task_name: str | None = Field(description="null: the task was deleted")
    status: str
    scheduled_at: UtcOut
    created_at: UtcOut
    ended_at: UtcOut | None
    node: str
    message: str


class ManagerAlive(BaseModel):
    manager_id: str
    version: str
    started_at: UtcOut
    last_seen: UtcOut
    alive: bool
    stopped_at: UtcOut | None = Field(None, description="when it stopped cleanly, if it did")
    tasks_owned: int = Field(0, description="timers it holds: its share of the enabled tasks")


class Overview(BaseModel):
    generated_at: UtcOut
    nodes: list[GroupNodes]
    last_hour: RunCounts
    last_day: RunCounts
    timeline: Timeline
    going: Going
    recent_failures: list[RecentFailure]
    managers: list[ManagerAlive]


def overview(
    session: Session,
    *,
    now: datetime | None = None,
    manager_silent_after: timedelta = timedelta(seconds=60),
    failures: int = 10,
    running: int = 20,
) -> Overview:
    """The dashboard's figures as of `now` (naive UTC; default: the clock)."""
    now = now or utcnow()
    start, end = _day(now)
    minutes = _day_by_minute(session, start, end, now)
    last_hour, last_day = _run_counts(minutes, end)
    return Overview(
        generated_at=now,
        nodes=_nodes(session),
        last_hour=last_hour,
        last_day=last_day,
        timeline=_timeline(minutes, start),
        going=_going(session, running),
        recent_failures=_recent_failures(session, failures),
        managers=managers(session, now, manager_silent_after),
    )


async def keep_warm(sessions: sessionmaker[Session], stop: asyncio.Event) -> None:
    """The manager's task: read the day's minutes once at start, in a thread, then the minutes
    since at the start of each minute, so a dashboard load finds them kept (a whole day read
    by a load: 0.5-1.3 s). A database error is logged once, and the next round tries again."""
    failing = False
    while not stop.is_set():
        try:
            await asyncio.to_thread(warm, sessions)
            if failing:
                log.info("manager: dashboard figures kept warm again")
            failing = False
        except SQLAlchemyError as err:
            if not failing:
                log.warning(
                    "manager: dashboard figures not kept warm: %s", getattr(err, "orig", err)
                )
            failing = True
        now = utcnow()
        next_minute = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        wait = (next_minute - now).total_seconds() + WARM_AFTER_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)


def warm(sessions: sessionmaker[Session], now: datetime | None = None) -> None:
    """Read and keep the settled minutes of the day before `now` that are not kept yet."""
    now = now or utcnow()
    with sessions() as session:
        _day_by_minute(session, *_day(now), now)


def _day(now: datetime) -> tuple[datetime, datetime]:
    """The timeline's [start, end): the 1440 minutes up to the end of `now`'s minute."""
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    return end - timedelta(minutes=TIMELINE_MINUTES), end


def managers(session: Session, now: datetime, silent_after: timedelta) -> list[ManagerAlive]:
    """Every manager that has run against this database, by id, with the tasks it owns."""
    held = dict(
        session.execute(
            select(TimerRow.manager_id, func.count()).group_by(TimerRow.manager_id)
        ).all()
    )
    out = []
    for m in session.scalars(select(Manager).order_by(Manager.manager_id)):
        alive = m.stopped_at is None and m.last_seen >= now - silent_after
        out.append(
            ManagerAlive(
                manager_id=m.manager_id,
                version=m.version,
                started_at=m.started_at,
                last_seen=m.last_seen,
                alive=alive,
                stopped_at=m.stopped_at,
                tasks_owned=int(held.get(m.manager_id, 0)) if alive else 0,
            )
        )
    return out


def _nodes(session: Session) -> list[GroupNodes]:
    groups = {name: GroupNodes(node_group=name) for name in session.scalars(select(NodeGroup.name))}
    counts = select(Node.node_group, Node.status, func.count()).group_by(
        Node.node_group, Node.status
    )
    for group, status, n in session.execute(counts):
        entry = groups.setdefault(group, GroupNodes(node_group=group))
        if status == NodeStatus.ONLINE:
            entry.online += n
        elif status == NodeStatus.OFFLINE:
            entry.offline += n
        else:
            entry.unknown += n
    return [groups[name] for name in sorted(groups)]


def _run_counts(minutes: dict[datetime, _Minute], end: datetime) -> tuple[RunCounts, RunCounts]:
    hour_ago, day_ago = end - timedelta(hours=1), end - timedelta(days=1)
    hour: dict[str, int] = dict.fromkeys(RunStatus, 0)
    day: dict[str, int] = dict.fromkeys(RunStatus, 0)
    for minute, figures in minutes.items():
        for status, n in figures.by_status.items():
            day[status] = day.get(status, 0) + n
            if minute >= hour_ago:
                hour[status] = hour.get(status, 0) + n
    return _counts(hour_ago, hour), _counts(day_ago, day)


def _counts(since: datetime, by_status: dict[str, int]) -> RunCounts:
    succeeded = by_status.get(RunStatus.SUCCEEDED, 0)
    finished = sum(
        n for status, n in by_status.items() if status not in UNFINISHED and status not in NOT_RUN
    )
    return RunCounts(
        since=since,
        total=sum(by_status.values()),
        by_status={str(k): v for k, v in by_status.items()},
        finished=finished,
        succeeded=succeeded,
        success_rate=succeeded / finished if finished else None,
    )


def _timeline(minutes: dict[datetime, _Minute], start: datetime) -> Timeline:
    fires = [0] * TIMELINE_MINUTES
    p99: list[float | None] = [None] * TIMELINE_MINUTES
    for minute, figures in minutes.items():
        if figures.lateness:
            index = (minute - start) // timedelta(minutes=1)
            fires[index], p99[index] = figures.fires_and_p99()
    return Timeline(start=start, fires=fires, p99_lateness_s=p99)


# --- the per-minute figures, and those kept --------------------------------------------------


@dataclass
class _Minute:
    """What the job log holds for one minute of created_at."""

    by_status: dict[str, int] = field(default_factory=dict)
    lateness: dict[int, tuple[int, float]] = field(default_factory=dict)  # bucket: (n, worst)
    _summary: tuple[int, float] | None = None

    def fires_and_p99(self) -> tuple[int, float]:
        """The minute's fires and their p99 lateness (computed once: a kept minute is final)."""
        if self._summary is None:
            total = sum(n for n, _ in self.lateness.values())
            self._summary = (total, _percentile(self.lateness, total, 0.99))
        return self._summary


@dataclass
class _Kept:
    """The settled minutes of one database (see SETTLE)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    # Held while minutes are read: a second caller waits, then reads only what is still missing.
    reading: threading.Lock = field(default_factory=threading.Lock)
    minutes: dict[datetime, _Minute] = field(default_factory=dict)


_KEPT: dict[str, _Kept] = {}
_KEPT_LOCK = threading.Lock()


def _kept_for(session: Session) -> _Kept:
    key = session.get_bind().engine.url.render_as_string(hide_password=True)
    with _KEPT_LOCK:
        return _KEPT.setdefault(key, _Kept())


def _day_by_minute(
    session: Session, start: datetime, end: datetime, now: datetime
) -> dict[datetime, _Minute]:
    """Every minute of [start, end): the settled ones from what is kept, the others read."""
    kept = _kept_for(session)
    with kept.reading:
        return _day_read(session, kept, start, end, now)


def _day_read(
    session: Session, kept: _Kept, start: datetime, end: datetime, now: datetime
) -> dict[datetime, _Minute]:
    settled_before = (now - SETTLE).replace(second=0, microsecond=0)
    # Minutes with an unfinished run are read again until it ends (status index: few rows).
    open_minutes = {
        at.replace(second=0, microsecond=0)
        for at in session.scalars(
            select(JobLog.created_at).where(
                JobLog.status.in_(UNFINISHED), JobLog.created_at >= start
            )
        )
    }
    step = timedelta(minutes=1)
    with kept.lock:
        for minute in [m for m in kept.minutes if m < start or m in open_minutes]:
            del kept.minutes[minute]
        have = dict(kept.minutes)
    wanted = [start + i * step for i in range(TIMELINE_MINUTES)]
    missing = [m for m in wanted if m not in have]
    read = _read_minutes(session, _ranges(missing, step)) if missing else {}
    result: dict[datetime, _Minute] = {}
    fresh: dict[datetime, _Minute] = {}
    for minute in wanted:
        figures = have.get(minute) or read.get(minute) or _Minute()
        result[minute] = figures
        if minute not in have and minute < settled_before and minute not in open_minutes:
            fresh[minute] = figures
    with kept.lock:
        kept.minutes.update(fresh)
    return result


def _ranges(minutes: list[datetime], step: timedelta) -> list[tuple[datetime, datetime]]:
    """Sorted minutes as [from, to) ranges; past MAX_RANGES of them, one range for all."""
    ranges: list[tuple[datetime, datetime]] = []
    for minute in minutes:
        if ranges and ranges[-1][1] == minute:
            ranges[-1] = (ranges[-1][0], minute + step)
        else:
            ranges.append((minute, minute + step))
    if len(ranges) > MAX_RANGES:
        return [(ranges[0][0], ranges[-1][1])]
    return ranges


def _read_minutes(
    session: Session, ranges: list[tuple[datetime, datetime]]
) -> dict[datetime, _Minute]:
    """Runs by minute and status, and fires by minute and lateness bucket, in `ranges`: one
    scan (the first load reads the whole day)."""
    dialect = session.get_bind().dialect.name
    minute = _minute_text(JobLog.created_at, dialect)
    within = or_(*[and_(JobLog.created_at >= a, JobLog.created_at < b) for a, b in ranges])
    lateness = _seconds_between(JobLog.scheduled_at, JobLog.created_at, dialect)
    is_fire = and_(JobLog.trigger.in_(FIRE_TRIGGERS), JobLog.attempt == 0, JobLog.shard_index == 0)
    bucket = case(
        (~is_fire, -1),  # not a fire: counted by status only
        *[(lateness <= bound, i) for i, bound in enumerate(LATENESS_BOUNDS_S)],
        else_=len(LATENESS_BOUNDS_S),
    )
    stmt = (
        select(minute, JobLog.status, bucket, func.count(), func.max(lateness))
        .where(within)
        .group_by(minute, JobLog.status, bucket)
    )
    found: dict[datetime, _Minute] = {}
    for text, status, b, n, worst in session.execute(stmt):
        # `YYYY-MM-DD HH:MM`: fromisoformat reads it 20 times faster than strptime.
        figures = found.setdefault(datetime.fromisoformat(text), _Minute())
        figures.by_status[status] = figures.by_status.get(status, 0) + n
        if b >= 0:
            seen, most = figures.lateness.get(int(b), (0, 0.0))
            figures.lateness[int(b)] = (seen + n, max(most, float(worst or 0.0)))
    return found


def _percentile(histogram: dict[int, tuple[int, float]], total: int, q: float) -> float:
    """The largest value of the bucket holding the q-th quantile."""
    wanted, seen = q * total, 0
    for b in sorted(histogram):
        n, worst = histogram[b]
        seen += n
        if seen >= wanted:
            return round(worst, 3)
    return round(histogram[max(histogram)][1], 3)


def _seconds_between(
    earlier: ColumnElement[Any] | InstrumentedAttribute[Any],
    later: ColumnElement[Any] | InstrumentedAttribute[Any],
    dialect: str,
) -> ColumnElement[Any]:
    """`later - earlier` in seconds (float), on SQLite and MySQL/MariaDB."""
    if dialect == "sqlite":
        return (func.julianday(later) - func.julianday(earlier)) * 86400.0
    return func.timestampdiff(literal_column("MICROSECOND"), earlier, later) / 1_000_000.0


def _minute_text(
    moment: ColumnElement[Any] | InstrumentedAttribute[Any], dialect: str
) -> ColumnElement[Any]:
    """The minute a date-time falls in, as text `YYYY-MM-DD HH:MM`."""
    if dialect == "sqlite":
        return func.strftime("%Y-%m-%d %H:%M", moment)
    return func.date_format(moment, "%Y-%m-%d %H:%i")


def _going(session: Session, limit: int) -> Going:
    counts = dict(
        session.execute(
            select(JobLog.status, func.count())
            .where(JobLog.status.in_(UNFINISHED))
            .group_by(JobLog.status)
        ).all()
    )
    rows = _newest(session, (RunStatus.RUNNING, RunStatus.DISPATCHED), limit)
    names = _task_names(session, {r.task_id for r in rows})
    return Going(
        pending=counts.get(RunStatus.PENDING, 0),
        dispatched=counts.get(RunStatus.DISPATCHED, 0),
        running=counts.get(RunStatus.RUNNING, 0),
        runs=[GoingRun.model_validate(_with_name(r, names)) for r in rows],
    )


def _recent_failures(session: Session, limit: int) -> list[RecentFailure]:
    rows = _newest(session, FAILED, limit)
    names = _task_names(session, {r.task_id for r in rows})
    return [RecentFailure.model_validate(_with_name(r, names)) for r in rows]


def _with_name(row: Any, names: dict[int, str]) -> dict[str, Any]:
    """A job-log row's columns and its task's name (None: the task was deleted)."""
    return {**row._mapping, "task_name": names.get(row.task_id)}


def _newest(session: Session, statuses: tuple[RunStatus, ...], limit: int) -> list[Any]:
    """The newest `limit` rows over `statuses`: one query per status, each walking the
    (status, created_at) index backwards, merged here (an IN over several statuses with an
    ORDER BY would sort every such row instead)."""
    if limit <= 0:
        return []
    columns = (
        JobLog.id,
        JobLog.task_id,
        JobLog.status,
        JobLog.node,
        JobLog.scheduled_at,
        JobLog.created_at,
        JobLog.started_at,
        JobLog.ended_at,
        JobLog.message,
    )
    rows: list[Any] = []
    for status in statuses:
        rows.extend(
            session.execute(
                select(*columns)
                .where(JobLog.status == status.value)
                .order_by(JobLog.created_at.desc(), JobLog.id.desc())
                .limit(limit)
            ).all()
        )
    rows.sort(key=lambda r: (r.created_at, r.id), reverse=True)
    return rows[:limit]


def _task_names(session: Session, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    return dict(session.execute(select(Task.id, Task.name).where(Task.id.in_(ids))).all())
