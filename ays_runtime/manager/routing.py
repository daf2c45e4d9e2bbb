"""Routing: which of a group's healthy nodes a run goes to.

`candidates()` returns nodes in the order to try. The dispatcher (manager/dispatch.py) tries
only the first, except for `failover`, which tries each in turn until one accepts;
`broadcast` sends one shard to every node.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections.abc import Sequence

from ays_runtime.registry.base import NodeRef
from ays_runtime.storage.models import RouteStrategy

_VIRTUAL_NODES = 100  # points per node on the hash ring: keeps the spread even


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class Router:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._round_robin: dict[int, itertools.count[int]] = {}
        self._rings: dict[tuple[str, ...], tuple[list[int], list[NodeRef]]] = {}
        # Runs this manager has in flight per node: least-busy adds it to the node's own count
        # (which arrives with heartbeats, a few seconds old).
        self.in_flight: dict[str, int] = {}

    def candidates(self, strategy: str, nodes: Sequence[NodeRef], task_id: int) -> list[NodeRef]:
        if not nodes:
            return []
        ordered = sorted(nodes, key=lambda n: (n.ip, n.port))
        match RouteStrategy(strategy):
            case RouteStrategy.FIRST | RouteStrategy.FAILOVER | RouteStrategy.BROADCAST:
                return ordered
            case RouteStrategy.ROUND_ROBIN:
                turn = next(self._round_robin.setdefault(task_id, itertools.count()))
                start = turn % len(ordered)
                return ordered[start:] + ordered[:start]
            case RouteStrategy.RANDOM:
                return self._rng.sample(ordered, len(ordered))
            case RouteStrategy.CONSISTENT_HASH:
                return self._ring_order(ordered, task_id)
            case RouteStrategy.LEAST_BUSY:
                return sorted(
                    ordered, key=lambda n: n.running_jobs + self.in_flight.get(n.address, 0)
                )

    def _ring_order(self, ordered: list[NodeRef], task_id: int) -> list[NodeRef]:
        key = tuple(n.address for n in ordered)
        ring = self._rings.get(key)
        if ring is None:
            points = sorted(
                (_hash(f"{n.address}#{v}"), i)
                for i, n in enumerate(ordered)
                for v in range(_VIRTUAL_NODES)
            )
            ring = ([p for p, _ in points], [ordered[i] for _, i in points])
            if len(self._rings) > 256:
                self._rings.clear()
            self._rings[key] = ring
        hashes, owners = ring
        start = bisect.bisect(hashes, _hash(f"task:{task_id}")) % len(hashes)
        seen: dict[str, NodeRef] = {}
        for owner in itertools.chain(owners[start:], owners[:start]):
            seen.setdefault(owner.address, owner)
            if len(seen) == len(ordered):
                break
        return list(seen.values())
