"""Logging set-up for the daemons: one format, optional file, never a secret.

Debug mode (`aysManager debug`, `aysNode debug`) shows Ays's own DEBUG lines; libraries stay
at INFO (some, below, at WARNING), since a few of them (grpc's `grpc._cython.cygrpc`,
httpcore) write a line per call at DEBUG. `debug_loggers` opens named ones up to DEBUG when
they are what is being debugged (`--debug-logger grpc`; `all`: every logger).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
OURS = "ays"  # every logger of Ays is ays.<part>
ALL = "all"
# Library chatter that would drown ours (heartbeats are requests too); uvicorn's start/stop
# notes are said by the daemons themselves, with their address.
NOISY_LOGGERS = (
    "httpx",
    "httpcore",
    "urllib3",  # py-consul (requests): one line per Consul request
    "uvicorn.access",
    "uvicorn.error",
    "asyncio",
    "sqlalchemy.engine",
    "alembic.runtime.migration",
)


def configure_logging(
    debug: bool, log_file: Path | None = None, debug_loggers: Iterable[str] = ()
) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    wanted = set(debug_loggers)
    everything = ALL in wanted
    level = logging.DEBUG if debug and everything else logging.INFO
    logging.basicConfig(level=level, format=FORMAT, handlers=handlers, force=True)
    logging.getLogger(OURS).setLevel(logging.DEBUG if debug else logging.NOTSET)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.NOTSET if everything else logging.WARNING)
    for name in wanted - {ALL}:
        logging.getLogger(name).setLevel(logging.DEBUG)
