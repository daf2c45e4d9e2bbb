"""The retry policy: exponential backoff with jitter, and which errors are worth retrying.

Each backend names its temporary errors (`TransientRegistryError`, `TransientTransportError`)
and retries only those with a `Backoff`; any other error is reported as it is. The jitter
keeps many clients that failed at the same moment (1,000 nodes losing Consul at once) from
coming back at the same moment too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


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
