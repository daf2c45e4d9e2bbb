"""Schedules: when a task fires.

Three forms are accepted:

* 6-field cron, seconds first (`sec min hour dom month dow`), as robfig/cron, Quartz/xxl-job,
  dkron and gocron read it, so tasks move over unchanged;
* 5-field cron, minute granularity (second 0);
* `@every 10s` fixed rates (units ms, s, m, h, d; combinations such as `1h30m`), and the
  `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly` shorthands.

A cron step must be 1 up to its field's span (`*/59` seconds, `*/23` hours, `*/6` days of the
week): croniter takes `*/60` or `*/0`, but such a step fires at most once in the field's
range, not every N units, so it is refused.

Cron is evaluated in the task's time zone, DST included, as croniter does it. Fixed rates are
anchored on the Unix epoch, so every manager computes the same slots: the slot time is the
key that stops a second manager from firing it again.

All datetimes in and out are naive UTC, the form the database stores.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from ays_runtime.exceptions import ScheduleError

_SHORTHANDS = {
    "@yearly": "0 0 0 1 1 *",
    "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0",
    "@daily": "0 0 0 * * *",
    "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_EPOCH = datetime(1970, 1, 1)
MIN_EVERY = timedelta(milliseconds=100)
_EXPANDED_MINUTES = 7 * 24 * 60  # CronSchedule.slots_between expands fields up to a week
# Five cron fields' expansions kept (`_expanded`): one per distinct set of fields (a few
# hundred bytes each; parse_schedule's cache holds as many croniter objects anyway).
EXPANSIONS_KEPT = 16384
_expansions: dict[str, list[list[Any]] | None] = {}
_expansions_lock = threading.Lock()
_UNKNOWN: Any = object()
# The moments a caller may ask slots about (a slot view's range, a forecast cell): croniter and
# datetime arithmetic overflow near the years 1 and 9999.
EARLIEST_SLOT = datetime(1970, 1, 1)
LATEST_SLOT = datetime(9000, 1, 1)
# The six cron fields in order, with the values each can take (day of week: 0 is Sunday).
_CRON_FIELDS = (
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 6),
)


class Schedule(ABC):
    """A parsed schedule. Instances are immutable and cheap to share between timers."""

    expression: str

    @abstractmethod
    def next_after(self, after: datetime) -> datetime:
        """The first slot strictly later than `after` (both naive UTC)."""

    def slots_between(self, start: datetime, end: datetime, limit: int) -> list[datetime]:
        """The slots in [start, end), in order, at most `limit` + 1 of them (so that a caller
        sees there are more than it takes)."""
        found: list[datetime] = []
        slot = self.next_after(start - timedelta(microseconds=1))
        while slot < end and len(found) <= limit:
            found.append(slot)
            slot = self.next_after(slot)
        return found

    @abstractmethod
    def count_between(self, start: datetime, end: datetime) -> int:
        """How many slots [start, end) holds. Safe from any thread (the slot ledger counts in
        the claim writer's): it does not move the instance's croniter."""

    def last_at_or_before(self, moment: datetime, not_before: datetime) -> datetime | None:
        """The latest slot in (not_before, moment], or None: which slot a misfire replays."""
        slot = self.next_after(not_before)
        if slot > moment:
            return None
        last = slot
        # Bounded: a misfire replay looks back at most over the downtime window.
        for _ in range(100_000):
            slot = self.next_after(slot)
            if slot > moment:
                return last
            last = slot
        return last


class CronSchedule(Schedule):
    def __init__(self, expression: str, fields: str, tz: ZoneInfo) -> None:
        self.expression = expression
        self._fields = fields
        self._tz = tz
        self._iter = croniter(fields, datetime.now(tz), second_at_beginning=True)
        # croniter's six fields (seconds first) expand to the same first five lists as the
        # five minute fields alone: keep them for cron_minutes (the forecast, the slot view).
        minute_fields = fields.split(" ", 1)[1]
        if minute_fields not in _expansions:
            _kept_expansion(
                minute_fields, _plain(self._iter.expanded[:5], self._iter.nth_weekday_of_month)
            )
        # Timers share parsed schedules, and a burst of due timers asks the same question
        # thousands of times ("the slot after 12:00:01?"): remember the last answer.
        self._last: tuple[datetime, datetime] | None = None
        # The scheduler asks on the event loop; the console's forecast and slot view ask from
        # the thread pool, on the same cached instance: croniter's state is one walk at a time.
        self._walk = threading.Lock()

    @property
    def fields(self) -> str:
        """The six cron fields croniter reads (seconds first, shorthands spelled out)."""
        return self._fields

    @property
    def tz(self) -> ZoneInfo:
        return self._tz

    def slots_between(self, start: datetime, end: datetime, limit: int) -> list[datetime]:
        """As Schedule's; over a week at most, from the fields' expansion (cron_minutes)
        rather than croniter's walk, ~30 times faster."""
        begin = start.replace(second=0, microsecond=0)
        minutes = -(-(end - begin) // timedelta(minutes=1))
        if minutes > _EXPANDED_MINUTES:
            return super().slots_between(start, end, limit)
        second_field, minute_fields = self._fields.split(" ", 1)
        seconds = cron_seconds(second_field)
        found: list[datetime] = []
        for m in cron_minutes(minute_fields, self._tz.key, begin, minutes):
            base = begin + timedelta(minutes=m)
            for s in seconds:
                slot = base + timedelta(seconds=s)
                if start <= slot < end:
                    found.append(slot)
                    if len(found) > limit:
                        return found
        return found

    def count_between(self, start: datetime, end: datetime) -> int:
        """From the fields' expansion (cron_minutes), a week at a time."""
        second_field, minute_fields = self._fields.split(" ", 1)
        seconds = cron_seconds(second_field)
        total = 0
        while start < end:
            stop = min(end, start + timedelta(days=7))
            begin = start.replace(second=0, microsecond=0)
            minutes = -(-(stop - begin) // timedelta(minutes=1))
            for m in cron_minutes(minute_fields, self._tz.key, begin, minutes):
                base = begin + timedelta(minutes=m)
                if start <= base and base + timedelta(minutes=1) <= stop:
                    total += len(seconds)
                else:
                    total += sum(start <= base + timedelta(seconds=s) < stop for s in seconds)
            start = stop
        return total

    def next_after(self, after: datetime) -> datetime:
        last = self._last
        if last is not None and last[0] == after:
            return last[1]
        local = after.replace(tzinfo=UTC).astimezone(self._tz)
        with self._walk:
            self._iter.set_current(local, force=True)
            nxt: datetime = self._iter.get_next(datetime)
        result = nxt.astimezone(UTC).replace(tzinfo=None)
        self._last = (after, result)
        return result


class EverySchedule(Schedule):
    def __init__(self, expression: str, period: timedelta) -> None:
        self.expression = expression
        self.period = period

    def next_after(self, after: datetime) -> datetime:
        elapsed = after - _EPOCH
        periods = elapsed // self.period + 1
        return _EPOCH + periods * self.period

    def count_between(self, start: datetime, end: datetime) -> int:
        first = self.next_after(start - timedelta(microseconds=1))
        return -(-(end - first) // self.period) if first < end else 0

    def last_at_or_before(self, moment: datetime, not_before: datetime) -> datetime | None:
        slot = _EPOCH + ((moment - _EPOCH) // self.period) * self.period
        return slot if slot > not_before else None


def parse_duration(text: str) -> timedelta:
    """`10s`, `500ms`, `1h30m` → timedelta; raises ValueError on anything else."""
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(text)
    return timedelta(seconds=total)


def parse_timezone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            "timezone", name, "an IANA time zone name such as UTC, Asia/Riyadh or Europe/Berlin"
        ) from None


@lru_cache(maxsize=65536)
def parse_schedule(expression: str, timezone: str = "UTC") -> Schedule:
    """Parse and validate; raises ScheduleError naming the field and the bad value.

    Cached: a manager with 100k tasks mostly shares a few hundred distinct schedules.
    Cron objects carry croniter state, walked under a lock of their own: the scheduler's event
    loop and the console's threads may ask the same instance.
    """
    tz = parse_timezone(timezone)
    text = " ".join(expression.split())
    if text.startswith("@every"):
        arg = text[len("@every") :].strip()
        try:
            period = parse_duration(arg)
        except ValueError:
            raise ScheduleError(
                "schedule", expression, "@every takes a duration such as 10s, 500ms or 1h30m"
            ) from None
        if period < MIN_EVERY:
            raise ScheduleError("schedule", expression, "@every must be at least 100ms")
        return EverySchedule(text, period)
    fields = _SHORTHANDS.get(text, text)
    parts = fields.split(" ")
    if fields.startswith("@"):
        raise ScheduleError(
            "schedule",
            expression,
            f"unknown shorthand; use @every <duration> or one of {', '.join(_SHORTHANDS)}",
        )
    if len(parts) == 5:
        fields = "0 " + fields
    elif len(parts) != 6:
        raise ScheduleError(
            "schedule",
            expression,
            "a cron expression has 6 fields (sec min hour day-of-month month day-of-week) "
            "or 5 (min hour day-of-month month day-of-week)",
        )
    _check_steps(expression, fields)
    try:
        # croniter parses the fields once, here (not again in croniter.is_valid first: that
        # doubled the cost of parsing, ~0.15 ms a schedule). Its errors are ValueErrors.
        schedule = CronSchedule(text, fields, tz)
    except (ValueError, KeyError):
        raise ScheduleError(
            "schedule", expression, "a valid cron expression, e.g. '*/10 * * * * *' (every 10 s)"
        ) from None
    try:
        schedule.next_after(datetime.now(UTC).replace(tzinfo=None))
    except (ValueError, KeyError, CroniterError) as err:
        raise ScheduleError(
            "schedule", expression, f"a cron expression that matches some date ({err})"
        ) from None
    return schedule


def _check_steps(expression: str, fields: str) -> None:
    """Refuse a step (`*/N`, `a-b/N`, `a/N`) of 0 or wider than its field's range, which
    croniter takes: `*/61` in the second field fires only at second 0, never every 61 s.
    Other malformed steps are left to croniter's own check."""
    for (name, low, high), field in zip(_CRON_FIELDS, fields.split(" "), strict=True):
        for item in field.split(","):
            _, slash, step = item.partition("/")
            if not (slash and step.isascii() and step.isdigit()):
                continue
            if not 1 <= int(step) <= high - low:
                raise ScheduleError(
                    "schedule",
                    expression,
                    f"the {name} field's step must be 1 to {high - low} ({name} runs "
                    f"{low}-{high}); '{item}' steps by {int(step)}",
                )


def check_slot_moment(field: str, moment: datetime) -> None:
    """Refuse (ScheduleError naming `field`) a naive UTC moment outside the years slots are
    computed for."""
    if not EARLIEST_SLOT <= moment <= LATEST_SLOT:
        raise ScheduleError(
            field,
            f"{moment.isoformat()}Z",
            f"a date-time from {EARLIEST_SLOT:%Y-%m-%d} to {LATEST_SLOT:%Y-%m-%d} (UTC)",
        )


# --- many slots at once (the forecast, the slot view) ---------------------------------------


def cron_minutes(fields: str, timezone: str, begin: datetime, minutes: int) -> list[int]:
    """The minutes of the window (from `begin`, naive UTC) whose minute, hour, day, month
    and weekday match the five cron `fields` in the time zone, in order.

    Matched day by day from croniter's expansion of the fields (cron's rule: when both day
    fields are restricted, either may match); fields with `L` or `#` are walked by croniter
    instead, and so is a window in which the zone's offset changes (DST: croniter's handling
    of the skipped and repeated hours is the scheduler's)."""
    if fields == "* * * * *":
        return list(range(minutes))
    expanded = _expanded(fields)
    if expanded is None:
        return cron_minutes_walked(fields, timezone, begin, minutes)
    mins, hours, doms, months, dows = (
        None if values == ["*"] else frozenset(values) for values in expanded
    )
    tz = parse_timezone(timezone)
    end = begin + timedelta(minutes=minutes)
    day = begin.replace(tzinfo=UTC).astimezone(tz).date()
    last_day = end.replace(tzinfo=UTC).astimezone(tz).date()
    if _offset_changes(tz, day, last_day):
        return cron_minutes_walked(fields, timezone, begin, minutes)
    minute_list = sorted(mins) if mins is not None else range(60)
    hour_list = sorted(hours) if hours is not None else range(24)
    # No offset change in the window (checked above): one offset for all its days, so a
    # day's minutes are whole numbers from the window's start.
    offset = datetime.combine(day, time(), tz).utcoffset() or timedelta(0)
    found: list[int] = []
    while day <= last_day:
        dom_ok = doms is None or day.day in doms
        dow_ok = dows is None or (day.weekday() + 1) % 7 in dows
        day_ok = (dom_ok or dow_ok) if doms is not None and dows is not None else dom_ok and dow_ok
        if day_ok and (months is None or day.month in months):
            midnight = (datetime.combine(day, time()) - offset - begin) // timedelta(minutes=1)
            for hour in hour_list:
                first = midnight + 60 * hour
                if first + 60 <= 0 or first >= minutes:
                    continue
                found.extend(first + m for m in minute_list if 0 <= first + m < minutes)
        day += timedelta(days=1)
    return sorted(set(found))


def cron_minutes_expanded(fields: str, timezone: str, begin: datetime, minutes: int) -> bool:
    """Whether `cron_minutes` matches this window from the expanded fields rather than
    croniter's walk: then each minute is matched on its own, and its answer for a window
    inside this one is a slice of this one's (shifted by the minutes between their starts).
    A walk's answer near a DST change depends on where it starts."""
    if fields == "* * * * *":
        return True
    if _expanded(fields) is None:
        return False
    tz = parse_timezone(timezone)
    first = begin.replace(tzinfo=UTC).astimezone(tz).date()
    end = begin + timedelta(minutes=minutes)
    return not _offset_changes(tz, first, end.replace(tzinfo=UTC).astimezone(tz).date())


def _expanded(fields: str) -> list[list[Any]] | None:
    """croniter's expansion of five cron fields, or None when it holds `L`, `#` or anything
    else than plain values (then croniter walks). Kept (EXPANSIONS_KEPT): a parsed
    CronSchedule leaves its own here, so the fields are not expanded a second time."""
    known = _expansions.get(fields, _UNKNOWN)
    if known is not _UNKNOWN:
        return known
    try:
        expanded, nth = croniter.expand(fields)
    except (CroniterError, ValueError):
        return _kept_expansion(fields, None)
    return _kept_expansion(fields, _plain(expanded, nth))


def _plain(expanded: list[list[Any]], nth: dict[int, Any]) -> list[list[Any]] | None:
    plain = all(isinstance(v, int) or v == "*" for values in expanded for v in values)
    return None if nth or not plain else [list(values) for values in expanded]


def _kept_expansion(fields: str, expanded: list[list[Any]] | None) -> list[list[Any]] | None:
    with _expansions_lock:
        if len(_expansions) >= EXPANSIONS_KEPT:
            _expansions.pop(next(iter(_expansions)))  # the oldest (dicts keep their order)
        _expansions[fields] = expanded
    return expanded


@lru_cache(maxsize=4096)
def _offset_changes(tz: ZoneInfo, first: date, last: date) -> bool:
    """Whether the zone's UTC offset differs between the midnights from `first` to `last`+1."""
    offsets = {
        datetime.combine(first + timedelta(days=d), time(), tz).utcoffset()
        for d in range((last - first).days + 2)
    }
    return len(offsets) > 1


def cron_minutes_walked(fields: str, timezone: str, begin: datetime, minutes: int) -> list[int]:
    """`_cron_minutes` by croniter's own iteration (slower: a minute step costs ~40 us)."""
    tz = parse_timezone(timezone)
    local = begin.replace(tzinfo=UTC).astimezone(tz) - timedelta(seconds=1)
    it = croniter("0 " + fields, local, second_at_beginning=True)
    found: list[int] = []
    for _ in range(minutes):
        moment: datetime = it.get_next(datetime)
        index = int((moment.astimezone(UTC).replace(tzinfo=None) - begin).total_seconds()) // 60
        if index >= minutes:
            break
        if index < 0:  # croniter's answer in a repeated (DST) hour can fall before `begin`
            continue
        if not found or index > found[-1]:
            found.append(index)
    return found


@lru_cache(maxsize=1024)
def cron_seconds(second_field: str) -> tuple[int, ...]:
    """The seconds of a minute a cron seconds field matches."""
    base = datetime(2000, 1, 1)
    it = croniter(
        f"{second_field} * * * * *", base - timedelta(seconds=1), second_at_beginning=True
    )
    seconds: list[int] = []
    while True:
        moment: datetime = it.get_next(datetime)
        if moment >= base + timedelta(minutes=1):
            return tuple(seconds)
        seconds.append(moment.second)
