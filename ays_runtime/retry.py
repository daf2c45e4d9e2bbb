"""The retry policy: exponential backoff with jitter, and which errors are worth retrying.

Each backend names its temporary errors (`TransientRegistryError`, `TransientTransportError`,
the database's `is_transient` in ays_runtime/storage/database.py) and retries only those with
a `Backoff` (`retry_call` does it for a blocking call); any other error is reported as it
is. The jitter keeps many clients that failed at the same moment (1,000 nodes losing Consul
at once) from coming back at the same moment too.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger("ays.retry")


@dataclass
class Backoff:
    """Delays `first`, 2 x `first`, ... up to `cap` seconds, each scaled by a random factor
    in [1 - jitter, 1]; `reset()` after a success starts again from `first`."""

    first: float = 0.5
    cap: float = 5.0
    jitter: float = 0.5
    attempt: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next(self) -> float:
        """The delay before the next attempt (and count this one)."""
        base = min(self.cap, self.first * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return base * (1 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self.attempt = 0


def retry_call(
    call: Callable[[], T],
    transient: Callable[[BaseException], bool],
    what: str,
    *,
    attempts: int = 5,
    backoff: Backoff | None = None,
) -> T:
    """`call()`, called again after a backoff while it raises an error that `transient`
    says is temporary, `attempts` times in all; the last error (or any other) is raised.
    Blocking: for worker threads. `what` names the call in the log line of each retry."""
    backoff = backoff or Backoff(first=0.05, cap=1.0)
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as err:
            if attempt == attempts or not transient(err):
                raise
            delay = backoff.next()
            log.warning(
                "%s: %s (attempt %d of %d); trying again in %.2fs",
                what,
                _first_line(err),
                attempt,
                attempts,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _first_line(err: BaseException) -> str:
    orig = getattr(err, "orig", None)  # SQLAlchemy: the driver's words, not the statement
    return (str(orig if orig is not None else err).splitlines() or [type(err).__name__])[0]
