"""The managers a node beats and reports to (built-in registry and transport).

A node names one manager (`manager.ip:port`) or several (`node.managers`), and learns the
others alive on the same database from each heartbeat answer. Any of them will do: managers
share the database, so a beat recorded by one keeps the node online for all, and a result
stored by one is stored. `ManagerPool.order()` is the order to try them in: the manager that
answered last first, then the others in turn, those that failed in the last DOWN_FOR seconds
last (a manager whose host is gone costs a connect timeout; it is not tried first again
until it has had time to come back, unless no other answers).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable, Sequence

from ays_runtime.config import EnvConfig, manager_address

log = logging.getLogger("ays.node.membership")

DOWN_FOR = 30.0  # seconds a manager that failed is tried after the others


def manager_url(address: str) -> str:
    """The base URL of the manager at `address` (IP:PORT, IPv6 in brackets)."""
    return f"http://{address}"


class ManagerPool:
    """Where a node's heartbeats and results go; see the module docstring. Not thread-safe:
    use it from the node's event loop."""

    def __init__(self, configured: Sequence[str], who: str) -> None:
        if not configured:
            raise ValueError("a node needs at least one manager")
        self.who = who
        self._configured = list(dict.fromkeys(manager_url(a) for a in configured))
        self._learned: list[str] = []
        self._current = self._configured[0]
        self._failed_at: dict[str, float] = {}

    @classmethod
    def for_config(cls, config: EnvConfig, who: str) -> ManagerPool:
        """`node.managers`, or the manager section's address when that list is empty."""
        manager = config.manager
        addresses = config.node.managers or [manager_address(f"{manager.ip}:{manager.port}")]
        return cls(addresses, who)

    @property
    def current(self) -> str:
        """The base URL of the manager that answered last (the first configured before)."""
        return self._current

    def urls(self) -> list[str]:
        """Every manager known: the configured ones, then the learned ones."""
        return self._configured + [u for u in self._learned if u not in self._configured]

    def order(self, first: str | None = None) -> list[str]:
        """The base URLs to try, in order; `first` (e.g. the manager that dispatched a run)
        leads unless it failed lately."""
        known = self.urls()
        start = known.index(self._current) if self._current in known else 0
        ordered = known[start:] + known[:start]
        if first is not None:
            ordered = [first, *(u for u in ordered if u != first)]
        now = time.monotonic()
        # sorted() is stable: the ones that failed lately go last, each group in its order.
        return sorted(ordered, key=lambda u: now - self._failed_at.get(u, -DOWN_FOR) < DOWN_FOR)

    def succeeded(self, url: str) -> None:
        """`url` took a beat: it comes first from now on."""
        self._failed_at.pop(url, None)
        self._current = url

    def answered(self, url: str) -> None:
        """`url` answered (a result): it is not down, whichever comes first."""
        self._failed_at.pop(url, None)

    def failed(self, url: str) -> None:
        """`url` did not answer (or not as a manager does): try the others first."""
        self._failed_at[url] = time.monotonic()

    def learn(self, addresses: Iterable[object]) -> None:
        """The managers a manager says are alive (its heartbeat answer), replacing those
        learned before; an entry that is not a reachable IP:PORT is ignored."""
        learned = []
        for address in addresses:
            try:
                normal = manager_address(str(address))
            except ValueError:
                continue
            host = normal.rpartition(":")[0].strip("[]")
            if ipaddress.ip_address(host).is_unspecified:  # a manager listening on 0.0.0.0
                continue
            learned.append(manager_url(normal))
        new = [u for u in learned if u not in self.urls()]
        if new:
            log.info("%s: learned of manager(s) %s", self.who, ", ".join(new))
        self._learned = learned
