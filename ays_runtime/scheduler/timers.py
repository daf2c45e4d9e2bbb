"""The in-memory timer list: what this manager will fire, ordered by next fire time.

A heap of (fire_at, seq, task_id) with lazy deletion: replacing or removing a timer leaves its
old heap entry behind, recognised as stale because the timer's current `seq` differs. All
methods are O(log n) and do no I/O; the fire loop sleeps until `next_deadline()`.

With `crowd`, the list also counts its live timers per whole second and keeps the seconds
holding at least `crowd` of them (`crowded`): a burst the fire loop starts on early.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from ays_runtime.scheduler.schedule import Schedule


@dataclass(slots=True)
class Timer:
    task_id: int
    version: int
    schedule: Schedule
    timezone: str
    misfire_policy: str
    fire_at: datetime  # the next slot, naive UTC
    seq: int = 0


class TimerList:
    def __init__(self, crowd: int | None = None) -> None:
        self._timers: dict[int, Timer] = {}
        self._heap: list[tuple[datetime, int, int]] = []
        self._seq = itertools.count(1)
        self._crowd = crowd
        self._per_second: Counter[datetime] = Counter()
        self.crowded: set[datetime] = set()  # whole seconds holding >= `crowd` live timers

    def __len__(self) -> int:
        return len(self._timers)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._timers

    def __iter__(self) -> Iterator[Timer]:
        return iter(list(self._timers.values()))

    def get(self, task_id: int) -> Timer | None:
        return self._timers.get(task_id)

    def put(self, timer: Timer) -> None:
        """Add or replace the timer of `timer.task_id`."""
        timer.seq = next(self._seq)
        replaced = self._timers.get(timer.task_id)
        self._timers[timer.task_id] = timer
        if self._crowd is not None:
            if replaced is not None:
                self._count(replaced.fire_at, -1)
            self._count(timer.fire_at, 1)
        heapq.heappush(self._heap, (timer.fire_at, timer.seq, timer.task_id))
        self._compact_if_needed()

    def remove(self, task_id: int) -> Timer | None:
        timer = self._timers.pop(task_id, None)
        if timer is not None and self._crowd is not None:
            self._count(timer.fire_at, -1)
        return timer

    def count_at(self, second: datetime) -> int:
        """Live timers due within the whole second `second` (counted only with `crowd`)."""
        return self._per_second.get(second, 0)

    def next_deadline(self) -> datetime | None:
        """When the earliest live timer is due, or None when there is none."""
        self._drop_stale_head()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: datetime, limit: int | None = None) -> list[Timer]:
        """Remove and return the timers due at or before `now`, earliest first: all of
        them, or the first `limit`.

        The caller reschedules each (with `put`) after computing its next slot.
        """
        due: list[Timer] = []
        while limit is None or len(due) < limit:
            self._drop_stale_head()
            if not self._heap or self._heap[0][0] > now:
                return due
            _, _, task_id = heapq.heappop(self._heap)
            timer = self._timers.pop(task_id)
            if self._crowd is not None:
                self._count(timer.fire_at, -1)
            due.append(timer)
        return due

    def _count(self, fire_at: datetime, step: int) -> None:
        second = fire_at.replace(microsecond=0) if fire_at.microsecond else fire_at
        count = self._per_second[second] + step
        if count:
            self._per_second[second] = count
        else:
            del self._per_second[second]
        assert self._crowd is not None
        if count >= self._crowd:
            self.crowded.add(second)
        else:
            self.crowded.discard(second)

    def _drop_stale_head(self) -> None:
        heap = self._heap
        while heap:
            _, seq, task_id = heap[0]
            timer = self._timers.get(task_id)
            if timer is not None and timer.seq == seq:
                return
            heapq.heappop(heap)

    def _compact_if_needed(self) -> None:
        # Many updates without fires would grow the heap with stale entries: rebuild it when
        # it holds more than twice the live timers.
        if len(self._heap) > 2 * len(self._timers) + 1024:
            self._heap = [(t.fire_at, t.seq, t.task_id) for t in self._timers.values()]
            heapq.heapify(self._heap)
