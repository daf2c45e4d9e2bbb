"""The fire forecast: how many slots every enabled task will fire, per minute and per second,
over the next hours, computed from the schedules alone (the console's heatmap and
`GET /api/v1/forecast` read it from here).

Contract (stable; the console builds on it):

    forecast(session, *, start=None, hours=24, threshold=100, pileups=20,
             tasks_per_pileup=20) -> Forecast
    tasks_at(session, at, *, limit=100, offset=0) -> TasksAt
    keep_warm(sessions, stop)   the manager's task: computes the forecast before it is asked

`Forecast` (pydantic; its date-times are aware, in UTC; JSON sends them with `Z`):

    start, end            the window: from the minute `start` falls in, `hours` long
    step_s                60: one heatmap cell per minute
    fires                 [n per minute], oldest first (hours * 60 of them)
    peak_second           [n per minute]: the most slots due in one second of that minute
    total_fires           their sum
    tasks, expressions    enabled tasks counted, distinct (schedule, time zone) pairs
    threshold             a second with at least this many slots due is a pile-up
    pileups               [Pileup], the largest first, at most `pileups`: seconds over the
                          threshold that share the same schedules, folded into one entry
                          ("900 fires at :00 of every minute")
    pileups_truncated     true when more seconds were over the threshold than were examined
                          (MAX_PILEUP_SECONDS) or more pile-ups found than returned
    invalid               [TaskRef] tasks whose schedule no longer parses (never fire)

`Pileup`: second (0-59, of the minute), fires (slots due in that second), minutes (in how
many minutes of the window), every_minute, first_at, last_at, summary (one sentence),
expressions [ExpressionShare(schedule, timezone, tasks)], tasks [TaskRef(id, name, schedule,
timezone)] (the first `tasks_per_pileup` by id) and tasks_total.

`tasks_at(at)` pages through every enabled task due in the second `at` (naive UTC) falls in:
what a heatmap cell is made of, when a pile-up has more tasks than it lists. ValidationError
naming `at` outside 1970-9000 (schedule.check_slot_moment).

How it stays fast for 10k tasks: the tasks are grouped by (schedule, time zone) and each
group's slots computed once; a cron schedule's minutes are matched day by day from
croniter's expansion of its fields (schedule.cron_minutes; croniter walks only `L`, `#` and
windows with a DST change) and its seconds from its seconds field once; an `@every` rate is
arithmetic. Work grows with the distinct schedules and the window, not with the tasks: about
0.06-0.13 s for 10k tasks on ~1,000 distinct schedules with nothing of the forecast cached,
plus ~0.15-0.3 s the first time a process parses those schedules (one croniter parse each,
cached by parse_schedule, whose expansion cron_minutes reuses; bench/forecast_bench.py). A
manager pays both before anyone asks: its scheduler parses the schedules at start, then
`keep_warm` computes the console's forecast in a thread, and, while a forecast of now was
asked within WATCHED_S, again at each new minute and when the tasks changed (it reads their
fingerprint every WATCH_POLL_S); a request arriving meanwhile waits for that
computation (`_computing`) and finds its answer kept. Then three caches, each bounded:

* a cron schedule's minutes for the window from the start of the hour, one hour longer
  (`_cron_window`, an LRU keyed by (fields, time zone, hour, length)): a window starting
  later in that hour is a slice of it, shifted by the minutes elapsed (when its minutes are
  matched from the expanded fields; croniter's walks, near a DST change, are kept per
  window start, as a walk's answer there depends on where it starts);
* per database engine, the enabled tasks' groups and rows as last read (`_Snapshot`), kept
  while the tasks' fingerprint (`_FINGERPRINT`: count, sum of versions, sum of ids, sum of the
  enabled ids, newest `updated_at`, one aggregate query per load) is unchanged: every change
  made through Ays (API, console, CLI, apply) bumps the task's version and `updated_at`, a
  new or deleted task changes the count and the sums, enabling or disabling changes the
  enabled sum; a change written behind Ays's back in SQL without them is not seen;
* in that snapshot, the last few forecasts answered (window start minute and parameters), so
  reloads within the minute answer at once. A Forecast returned may be shared: read it.

`forecast` raises ValidationError naming `hours` outside 1..MAX_HOURS and `start` outside
1970-9000.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from array import array
from bisect import bisect_left
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from weakref import WeakKeyDictionary

from pydantic import BaseModel, Field
from sqlalchemy import Engine, case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.exceptions import ScheduleError, ValidationError
from ays_runtime.scheduler.schedule import (
    CronSchedule,
    EverySchedule,
    Schedule,
    check_slot_moment,
    cron_minutes,
    cron_minutes_expanded,
    cron_seconds,
    parse_schedule,
)
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import Task
from ays_runtime.web.fields import UtcOut

MAX_HOURS = 168  # a week: 604,800 seconds held as one array of counts
DEFAULT_HOURS = 24
DEFAULT_THRESHOLD = 100
# Seconds over the threshold examined for who is behind them (the fullest first).
MAX_PILEUP_SECONDS = 20_000
_EPOCH = datetime(1970, 1, 1)
_US = 1_000_000
# Cron windows kept (one per distinct schedule, time zone and hour): ~1,100 schedules twice
# over, each at most 169 h of minutes as 2-byte numbers (~20 kB; a day's: ~3 kB).
CRON_WINDOWS = 4096
# Forecasts kept per snapshot of the tasks: a few windows or thresholds asked in turn.
FORECASTS_KEPT = 8
# keep_warm computes at each new minute the forecasts of now asked within this many seconds
# (someone has the page open: it refreshes), and the console's at start.
WATCHED_S = 900.0
# While watched, how often keep_warm looks for a change of the tasks (the fingerprint).
WATCH_POLL_S = 2.0
WARM_AT_START = (DEFAULT_HOURS, DEFAULT_THRESHOLD, 20, 20)
# After the minute starts: the request computing the same minute waits on `_computing`.
WARM_AFTER_S = 0.05

log = logging.getLogger("ays.manager.forecast")


class TaskRef(BaseModel):
    id: int
    name: str
    schedule: str
    timezone: str


class ExpressionShare(BaseModel):
    schedule: str
    timezone: str
    tasks: int


class Pileup(BaseModel):
    second: int = Field(description="the second of the minute (0-59)")
    fires: int = Field(description="slots due in that second")
    minutes: int = Field(description="how many minutes of the window have this pile-up")
    every_minute: bool
    first_at: UtcOut
    last_at: UtcOut
    summary: str
    expressions: list[ExpressionShare]
    tasks: list[TaskRef] = Field(description="the first tasks behind it, by id")
    tasks_total: int


class Forecast(BaseModel):
    start: UtcOut
    end: UtcOut
    step_s: int = 60
    fires: list[int] = Field(description="slots due per minute, oldest first")
    peak_second: list[int] = Field(description="most slots due in one second of the minute")
    total_fires: int
    tasks: int
    expressions: int
    threshold: int
    pileups: list[Pileup]
    pileups_truncated: bool
    invalid: list[TaskRef]


class TasksAt(BaseModel):
    at: UtcOut = Field(description="the second's start")
    items: list[TaskRef]
    total: int


@dataclass
class _Group:
    """The enabled tasks sharing one (schedule, time zone)."""

    schedule: Schedule
    expression: str
    timezone: str
    task_ids: list[int] = field(default_factory=list)


@dataclass
class _Snapshot:
    """The enabled tasks as read when the tasks' fingerprint was `fingerprint`: their groups,
    their rows by id (a TaskRef is made only for the tasks listed: 10k pydantic models would
    cost more than the forecast), the tasks whose schedule no longer parses, and the last
    forecasts answered from them."""

    fingerprint: tuple[Any, ...]
    groups: list[_Group]
    refs: dict[int, Any]
    invalid: list[TaskRef]
    forecasts: OrderedDict[tuple[Any, ...], Forecast] = field(default_factory=OrderedDict)


# What changes when a task does (see the module docstring): read before every forecast.
_FINGERPRINT = select(
    func.count(Task.id),
    func.sum(Task.version),
    func.sum(Task.id),
    func.sum(case((Task.enabled.is_(True), Task.id), else_=0)),
    func.max(Task.updated_at),
)
_snapshots: WeakKeyDictionary[Engine, _Snapshot] = WeakKeyDictionary()
_snapshots_lock = threading.Lock()
_computing = threading.Lock()
# The parameters of the forecasts of now asked (hours, threshold, pileups, tasks_per_pileup)
# and when (time.monotonic()), for keep_warm: the newest FORECASTS_KEPT.
_asked: OrderedDict[tuple[int, int, int, int], float] = OrderedDict()
_UNPARSED: Any = object()


def forecast(
    session: Session,
    *,
    start: datetime | None = None,
    hours: int = DEFAULT_HOURS,
    threshold: int = DEFAULT_THRESHOLD,
    pileups: int = 20,
    tasks_per_pileup: int = 20,
) -> Forecast:
    """The slots due from the minute `start` falls in (default now), `hours` long."""
    if not 1 <= hours <= MAX_HOURS:
        raise ValidationError("hours", hours, f"a whole number of hours from 1 to {MAX_HOURS}")
    begin = (start or utcnow()).replace(second=0, microsecond=0)
    check_slot_moment("start", begin)
    params = (hours, threshold, pileups, tasks_per_pileup)
    if start is None:
        _note_asked(params)
    # One computation at a time: a request arriving while keep_warm computes the same
    # forecast waits for it and finds it kept, rather than computing it again beside it.
    with _computing:
        snapshot = _snapshot(session)
        key = (begin, *params)
        with _snapshots_lock:
            known = snapshot.forecasts.get(key)
            if known is not None:
                snapshot.forecasts.move_to_end(key)
                return known
        answer = _computed(snapshot, begin, hours, threshold, pileups, tasks_per_pileup)
        with _snapshots_lock:
            snapshot.forecasts[key] = answer
            while len(snapshot.forecasts) > FORECASTS_KEPT:
                snapshot.forecasts.popitem(last=False)
    return answer


# --- kept warm by the manager ---------------------------------------------------------------


def _note_asked(params: tuple[int, int, int, int]) -> None:
    with _snapshots_lock:
        _asked[params] = time.monotonic()
        _asked.move_to_end(params)
        while len(_asked) > FORECASTS_KEPT:
            _asked.popitem(last=False)


def _watched(now: float) -> list[tuple[int, int, int, int]]:
    """The parameters of the forecasts of now asked within the last WATCHED_S seconds."""
    with _snapshots_lock:
        return [params for params, at in _asked.items() if now - at <= WATCHED_S]


async def keep_warm(sessions: sessionmaker[Session], stop: asyncio.Event) -> None:
    """The manager's task: compute the console's forecast once at start (after the scheduler
    has parsed the tasks' schedules), then, while forecasts of now were asked for within the
    last WATCHED_S seconds, those at the start of each minute and every WATCH_POLL_S seconds
    (a fingerprint query; the tasks read again when they changed), so a page load finds its
    forecast kept instead of computing it: reading the tasks, expanding their schedules,
    ~0.1-0.3 s. A database error is logged once, and the next round tries again."""
    watched: list[tuple[int, int, int, int]] = [WARM_AT_START]
    failing = False
    while not stop.is_set():
        for hours, threshold, pileups, per_pileup in watched:
            try:
                await asyncio.to_thread(_warm, sessions, hours, threshold, pileups, per_pileup)
            except SQLAlchemyError as err:
                if not failing:
                    log.warning("manager: forecast not kept warm: %s", getattr(err, "orig", err))
                failing = True
                break
            if failing:
                log.info("manager: forecast kept warm again")
            failing = False
        now = utcnow()
        next_minute = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        wait = (next_minute - now).total_seconds() + WARM_AFTER_S
        if watched:
            wait = min(wait, WATCH_POLL_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)
        watched = _watched(time.monotonic())


def _warm(
    sessions: sessionmaker[Session], hours: int, threshold: int, pileups: int, per_pileup: int
) -> None:
    with sessions() as session:
        forecast(
            session,
            start=utcnow(),
            hours=hours,
            threshold=threshold,
            pileups=pileups,
            tasks_per_pileup=per_pileup,
        )


def _computed(
    snapshot: _Snapshot,
    begin: datetime,
    hours: int,
    threshold: int,
    pileups: int,
    tasks_per_pileup: int,
) -> Forecast:
    seconds = hours * 3600
    groups, refs = snapshot.groups, snapshot.refs
    cells = array("q", bytes(8 * seconds))
    plans = [_plan(g, begin, seconds) for g in groups]
    for group, plan in zip(groups, plans, strict=True):
        plan.add_to(cells, len(group.task_ids))
    minutes = seconds // 60
    fires, peak = [0] * minutes, [0] * minutes
    for m in range(minutes):
        window = cells[m * 60 : m * 60 + 60]
        fires[m] = sum(window)
        peak[m] = max(window)
    found, truncated = _pileups(cells, plans, begin, threshold)
    # The pile-ups holding the most slots first: 900 every minute before 1,000 once.
    found.sort(key=lambda p: (-p.fires * p.minutes, -p.fires, p.first_at))
    shown = [_described(p, groups, refs, minutes, tasks_per_pileup) for p in found[:pileups]]
    return Forecast(
        start=begin,
        end=begin + timedelta(seconds=seconds),
        fires=fires,
        peak_second=peak,
        total_fires=sum(fires),
        tasks=sum(len(g.task_ids) for g in groups),
        expressions=len(groups),
        threshold=threshold,
        pileups=shown,
        pileups_truncated=truncated or len(found) > pileups,
        invalid=snapshot.invalid,
    )


def tasks_at(session: Session, at: datetime, *, limit: int = 100, offset: int = 0) -> TasksAt:
    """Every enabled task with a slot in the second `at` falls in, by id, one page of them."""
    check_slot_moment("at", at)
    second = at.replace(microsecond=0)
    snapshot = _snapshot(session)
    due: list[int] = []
    before = second - timedelta(microseconds=1)
    for g in snapshot.groups:
        if g.schedule.next_after(before) < second + timedelta(seconds=1):
            due.extend(g.task_ids)
    due.sort()
    return TasksAt(
        at=second,
        items=[_ref(snapshot.refs[i]) for i in due[offset : offset + limit]],
        total=len(due),
    )


# --- the tasks, read once per change ----------------------------------------------------------


def _snapshot(session: Session) -> _Snapshot:
    """The enabled tasks of the session's database: the snapshot kept for its engine while
    the tasks' fingerprint is unchanged, else read now (and kept)."""
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    fingerprint = tuple(session.execute(_FINGERPRINT).one())
    with _snapshots_lock:
        kept = _snapshots.get(engine)
    if kept is not None and kept.fingerprint == fingerprint:
        return kept
    # Read after the fingerprint: a change landing in between is in the rows and changes the
    # next fingerprint, so the snapshot is read again then (never one older than its key).
    fresh = _Snapshot(fingerprint, *_groups(session))
    with _snapshots_lock:
        _snapshots[engine] = fresh
    return fresh


def _groups(session: Session) -> tuple[list[_Group], dict[int, Any], list[TaskRef]]:
    """The enabled tasks by (schedule, time zone); their rows by id; the tasks whose
    schedule no longer parses."""
    rows = (
        session.connection()
        .execute(
            select(Task.id, Task.name, Task.schedule, Task.timezone)
            .where(Task.enabled.is_(True))
            .order_by(Task.id)
        )
        .all()
    )
    groups: dict[tuple[str, str], _Group] = {}
    refs: dict[int, Any] = {}
    invalid: list[TaskRef] = []
    parsed: dict[tuple[str, str], Schedule | None] = {}  # one parse per distinct pair
    for row in rows:
        task_id, _, expression, tz = row
        schedule = parsed.get((expression, tz), _UNPARSED)
        if schedule is _UNPARSED:
            schedule = parsed[expression, tz] = _parsed(expression, tz)
        if schedule is None:
            invalid.append(_ref(row))
            continue
        refs[task_id] = row
        key = (schedule.expression, tz)
        if key not in groups:
            groups[key] = _Group(schedule, expression, tz)
        groups[key].task_ids.append(task_id)
    return list(groups.values()), refs, invalid


def _parsed(expression: str, timezone: str) -> Schedule | None:
    try:
        return parse_schedule(expression, timezone)
    except ScheduleError:
        return None


def _ref(row: Any) -> TaskRef:
    return TaskRef(id=row[0], name=row[1], schedule=row[2], timezone=row[3])


class _Plan:
    """One schedule's slots in the window, as seconds from its start."""

    def add_to(self, cells: array[int], weight: int) -> None:
        raise NotImplementedError

    def count_at(self, second: int) -> int:
        """Slots due in that second of the window."""
        raise NotImplementedError


class _CronPlan(_Plan):
    def __init__(self, minutes: list[int], seconds: tuple[int, ...]) -> None:
        self.minutes = minutes
        self.minute_set = frozenset(minutes)
        self.seconds = seconds
        self.second_set = frozenset(seconds)

    def add_to(self, cells: array[int], weight: int) -> None:
        for m in self.minutes:
            base = m * 60
            for s in self.seconds:
                cells[base + s] += weight

    def count_at(self, second: int) -> int:
        return int(second % 60 in self.second_set and second // 60 in self.minute_set)


class _EveryPlan(_Plan):
    def __init__(self, period: timedelta, begin: datetime, seconds: int) -> None:
        self.period_us = period // timedelta(microseconds=1)
        self.begin_us = (begin - _EPOCH) // timedelta(microseconds=1)
        self.seconds = seconds

    def _before(self, second: int) -> int:
        """Slots strictly before that second of the window, counted from the epoch."""
        return -(-(self.begin_us + second * _US) // self.period_us)

    def count_at(self, second: int) -> int:
        return self._before(second + 1) - self._before(second)

    def add_to(self, cells: array[int], weight: int) -> None:
        if self.period_us >= _US:  # at most one slot a second: walk the slots
            first = self._before(0) * self.period_us - self.begin_us
            for offset in range(first, self.seconds * _US, self.period_us):
                cells[offset // _US] += weight
            return
        for second in range(self.seconds):
            cells[second] += weight * self.count_at(second)


def _plan(group: _Group, begin: datetime, seconds: int) -> _Plan:
    schedule = group.schedule
    if isinstance(schedule, EverySchedule):
        return _EveryPlan(schedule.period, begin, seconds)
    assert isinstance(schedule, CronSchedule)
    second_field, minute_fields = schedule.fields.split(" ", 1)
    tz = group.timezone
    minutes = seconds // 60
    hour = begin.replace(minute=0)
    if not cron_minutes_expanded(minute_fields, tz, hour, minutes + 60):
        # Walked by croniter (`L`, `#`, a DST change): kept for this very window only.
        kept = _cron_window(minute_fields, tz, begin, minutes)
        return _CronPlan(list(kept), cron_seconds(second_field))
    # The window is a slice of the one from the start of its hour, an hour longer (cached):
    # the minutes elapsed since are cut from its start and subtracted.
    shift = (begin - hour) // timedelta(minutes=1)
    kept = _cron_window(minute_fields, tz, hour, minutes + 60)
    first, last = bisect_left(kept, shift), bisect_left(kept, shift + minutes)
    return _CronPlan([m - shift for m in kept[first:last]], cron_seconds(second_field))


@lru_cache(maxsize=CRON_WINDOWS)
def _cron_window(minute_fields: str, timezone: str, start: datetime, minutes: int) -> array[int]:
    """cron_minutes of the window, as 2-byte numbers (a week and an hour is 10,140 minutes)."""
    return array("H", cron_minutes(minute_fields, timezone, start, minutes))


# --- pile-ups -------------------------------------------------------------------------------


@dataclass
class _Found:
    second: int
    fires: int
    groups: tuple[int, ...]
    at: list[datetime]

    @property
    def minutes(self) -> int:
        return len(self.at)

    @property
    def first_at(self) -> datetime:
        return self.at[0]


def _pileups(
    cells: array[int], plans: list[_Plan], begin: datetime, threshold: int
) -> tuple[list[_Found], bool]:
    """The seconds with at least `threshold` slots due, folded by (second of the minute,
    schedules behind it); whether some were left unexamined."""
    over = [i for i, n in enumerate(cells) if n >= threshold]
    truncated = len(over) > MAX_PILEUP_SECONDS
    if truncated:
        over.sort(key=lambda i: -cells[i])
        over = sorted(over[:MAX_PILEUP_SECONDS])
    anywhere = [g for g, plan in enumerate(plans) if not isinstance(plan, _CronPlan)]
    over_set = set(over)
    behind: dict[int, list[int]] = defaultdict(list)
    for index, plan in enumerate(plans):
        if isinstance(plan, _CronPlan):
            for m in plan.minutes:
                for s in plan.seconds:
                    if m * 60 + s in over_set:
                        behind[m * 60 + s].append(index)
    folded: dict[tuple[int, tuple[int, ...]], _Found] = {}
    for i in over:
        groups = tuple(sorted([*behind[i], *(g for g in anywhere if plans[g].count_at(i))]))
        key = (i % 60, groups)
        entry = folded.get(key)
        moment = begin + timedelta(seconds=i)
        if entry is None:
            folded[key] = _Found(i % 60, cells[i], groups, [moment])
        else:
            entry.fires = max(entry.fires, cells[i])
            entry.at.append(moment)
    return list(folded.values()), truncated


def _described(
    found: _Found, groups: list[_Group], refs: dict[int, Any], minutes: int, limit: int
) -> Pileup:
    behind = [groups[g] for g in found.groups]
    task_ids = sorted(i for g in behind for i in g.task_ids)
    every_minute = found.minutes == minutes
    last_at = found.at[-1]
    if every_minute:
        when = f"at :{found.second:02d} of every minute"
    elif found.minutes == 1:
        when = f"at {found.first_at:%Y-%m-%d %H:%M:%S} UTC"
    else:
        when = (
            f"at :{found.second:02d} of {found.minutes} minutes from "
            f"{found.first_at:%Y-%m-%d %H:%M} to {last_at:%Y-%m-%d %H:%M} UTC"
        )
    schedules = len(behind)
    return Pileup(
        second=found.second,
        fires=found.fires,
        minutes=found.minutes,
        every_minute=every_minute,
        first_at=found.first_at,
        last_at=last_at,
        summary=f"{found.fires} fires {when}, from {len(task_ids)} task(s) on "
        f"{schedules} schedule(s)",
        expressions=sorted(
            (
                ExpressionShare(schedule=g.expression, timezone=g.timezone, tasks=len(g.task_ids))
                for g in behind
            ),
            key=lambda e: -e.tasks,
        ),
        tasks=[_ref(refs[i]) for i in task_ids[:limit]],
        tasks_total=len(task_ids),
    )
