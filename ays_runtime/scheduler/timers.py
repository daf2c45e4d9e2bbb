"""The in-memory timer list: what this manager will fire, ordered by next fire time.

A heap of (fire_at, seq, task_id) with lazy deletion: replacing or removing a timer leaves its
old heap entry behind, recognised as stale because the timer's current `seq` differs. All
methods are O(log n) and do no I/O; the fire loop sleeps until `next_deadline()`.
"""

from __future__ import annotations

import heapq
import itertools
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
    def __init__(self) -> None:
        self._timers: dict[int, Timer] = {}
        self._heap: list[tuple[datetime, int, int]] = []
        self._seq = itertools.count(1)

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
        self._timers[timer.task_id] = timer
        heapq.heappush(self._heap, (timer.fire_at, timer.seq, timer.task_id))
        self._compact_if_needed()

    def remove(self, task_id: int) -> Timer | None:
        return self._timers.pop(task_id, None)

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
            due.append(self._timers.pop(task_id))
        return due

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
