"""Where a role's running service keeps its files; derived from the config alone, so the
daemon, its lifecycle commands and the installer agree without being told.

    <data_dir>/run/<service>.pid      the serving process (pidfile.py)
    <data_dir>/run/<service>.reload   the outcome of the last reload (runner.py)
    <log_dir>/<service>.log           the log (stdout and stderr under own supervision)

The files a service writes get the same modes with systemd and without: its units say
UMask=0027, and the programs set that umask themselves (`service_umask`), so directories are
0750 and the database (with its -wal and -shm), the logs and the node's result spool 0640.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ays_runtime.config import EnvConfig, ManagerSettings, NodeSettings

Role = Literal["manager", "node"]

SERVICE_NAMES: dict[Role, str] = {"manager": "aysmanager", "node": "aysnode"}
PROGRAM_NAMES: dict[Role, str] = {"manager": "aysManager", "node": "aysNode"}
SERVICE_UMASK = 0o027  # the units' UMask=
DIR_MODE = 0o750  # conf, log and data dirs, as installConfig and install create them


def service_umask() -> None:
    """Files and directories this process creates from now on get the service's modes."""
    os.umask(SERVICE_UMASK)


@dataclass(frozen=True)
class ServiceFiles:
    role: Role
    config: EnvConfig

    @property
    def service(self) -> str:
        return SERVICE_NAMES[self.role]

    @property
    def program_name(self) -> str:
        return PROGRAM_NAMES[self.role]

    @property
    def section(self) -> ManagerSettings | NodeSettings:
        return self.config.manager if self.role == "manager" else self.config.node

    @property
    def address(self) -> tuple[str, int]:
        return self.section.ip, self.section.port

    @property
    def run_dir(self) -> Path:
        return Path(self.section.data_dir) / "run"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"{self.service}.pid"

    @property
    def reload_record(self) -> Path:
        return self.run_dir / f"{self.service}.reload"

    @property
    def log_file(self) -> Path:
        return Path(self.section.log_dir) / f"{self.service}.log"
