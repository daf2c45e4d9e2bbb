"""Refused requests, logged once per source per minute with a count.

A caller that keeps sending a bad token, an oversized body or a bad field (a misconfigured
node every two seconds, a scanner) would otherwise fill the log with one line per request.
The first refusal from a source is logged at once, with what was wrong; the ones after it
within `window` seconds are only counted, and when the window ends one line says how many
there were, by status, and the last of them. A source that goes on being refused gets that
one line per window; one that stops is logged at once again the next time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW = 60.0


@dataclass
class _Window:
    opened: float
    counts: Counter[int] = field(default_factory=Counter)
    last: str = ""
    timer: asyncio.TimerHandle | None = None


class RefusalLog:
    """`refused(source, status, request, why)` from code on the event loop (or on none)."""

    def __init__(
        self,
        who: str,
        logger: logging.Logger,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.who = who
        self.log = logger
        self.window = window
        self.clock = clock
        self._open: dict[str, _Window] = {}

    def refused(self, source: str, status: int, request: str, why: str) -> None:
        """Note one refusal: `request` ("POST /api/v1/tasks"), `why` (never a secret)."""
        now = self.clock()
        self.close_due(now)
        current = self._open.get(source)
        said = f"{request}: {why}" if why else request
        if current is None:
            self.log.warning(
                "%s: refused %s from %s: %s (%d)", self.who, request, source, why, status
            )
            self._open[source] = _Window(now, timer=self._timer(source))
            return
        current.counts[status] += 1
        current.last = f"{said} ({status})"

    def close_due(self, now: float | None = None) -> None:
        """Log and close every window that has ended (also called on each refusal, so no
        loop is needed)."""
        now = self.clock() if now is None else now
        for source, current in list(self._open.items()):
            if now - current.opened >= self.window:
                self._close(source, current, now)

    def _close(self, source: str, current: _Window, now: float) -> None:
        if current.timer is not None:
            current.timer.cancel()
        del self._open[source]
        total = sum(current.counts.values())
        if not total:
            return
        by_status = ", ".join(f"{status} x{n}" for status, n in sorted(current.counts.items()))
        self.log.warning(
            "%s: refused %d more request(s) from %s in the last %.0f s (%s); the last: %s",
            self.who,
            total,
            source,
            now - current.opened,
            by_status,
            current.last,
        )
        # Still being refused: the next refusal is counted in a new window, not logged.
        self._open[source] = _Window(now, timer=self._timer(source))

    def _timer(self, source: str) -> asyncio.TimerHandle | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test, a thread): the next refusal closes it
            return None
        return loop.call_later(self.window, self._on_timer, source)

    def _on_timer(self, source: str) -> None:
        current = self._open.get(source)
        if current is None:
            return
        current.timer = None
        now = self.clock()
        if now - current.opened >= self.window:
            self._close(source, current, now)
        else:  # the clock says not yet (a test's clock): look again later
            current.timer = self._timer(source)
