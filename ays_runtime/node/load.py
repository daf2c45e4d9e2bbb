"""The host's load as a node reports it in each heartbeat (built-in registry).

    host_load() -> HostLoad(load_1m, cpu_count, memory_percent)

Read with psutil at each beat (/proc/loadavg and /proc/meminfo on Linux: microseconds). A
figure the platform cannot give is None, never an error: the heartbeat's load fields are
optional, and a beat matters more than its figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil

log = logging.getLogger("ays.node.load")


@dataclass(frozen=True)
class HostLoad:
    load_1m: float | None
    cpu_count: int | None
    memory_percent: float | None


def host_load() -> HostLoad:
    load_1m: float | None = None
    memory: float | None = None
    try:
        load_1m = round(psutil.getloadavg()[0], 2)
    except OSError as err:
        log.debug("node: no load average: %s", err)
    try:
        memory = round(psutil.virtual_memory().percent, 1)
    except OSError as err:
        log.debug("node: no memory figure: %s", err)
    return HostLoad(load_1m, psutil.cpu_count() or None, memory)
