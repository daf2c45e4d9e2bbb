"""Logging set-up for the daemons: one format, optional file, never a secret."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(debug: bool, log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format=FORMAT, handlers=handlers, force=True
    )
    # Library chatter that would drown ours, even in debug (heartbeats are requests too);
    # uvicorn's start/stop notes are said by the daemons themselves, with their address.
    noisy_loggers = (
        "httpx",
        "httpcore",
        "urllib3",  # py-consul (requests): one line per Consul request
        "uvicorn.access",
        "uvicorn.error",
        "asyncio",
        "sqlalchemy.engine",
        "alembic.runtime.migration",
    )
    for noisy in noisy_loggers:
        logging.getLogger(noisy).setLevel(logging.WARNING)
