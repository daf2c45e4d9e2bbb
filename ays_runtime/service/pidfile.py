"""The pidfile of a service process (the model is gunicorn's pidfile.py).

The file holds one line, the pid. It is written atomically (a temp file in the same
directory, renamed into place), so a reader sees the old pid or the new one, never half.

A pid read from the file is believed only while a process with that pid exists, is not a
zombie, and was started no later than the file was written. After a crash or a reboot the
pid may belong to some unrelated process started since: that one started after the file was
written, so the pidfile reads as stale instead of naming it.

During a reload the old process writes its successor's pid into the file (`write`), and a
process leaving removes the file only if it still holds its own pid (`remove_if_mine`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import psutil

from ays_runtime.exceptions import ServiceError

# Timestamps of process start and file writes come from different clocks' rounding.
_CLOCK_SLACK = 1.0


class Pidfile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> int | None:
        """The pid written in the file; None when there is no file or no pid in it."""
        try:
            text = self.path.read_text(encoding="ascii", errors="replace").strip()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise ServiceError(f"{self.path}: cannot read the pidfile: {err.strerror}") from None
        return int(text) if text.isdigit() and int(text) > 0 else None

    def running(self) -> int | None:
        """The pid in the file if that process is alive and is the one the file was written
        for; None when there is no file or it is stale."""
        pid = self.read()
        if pid is None:
            return None
        try:
            written = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        return pid if process_alive(pid, not_after=written + _CLOCK_SLACK) else None

    def create(self, pid: int) -> None:
        """Write `pid` unless another live process holds the file (a stale file is replaced)."""
        holder = self.running()
        if holder is not None and holder != pid:
            raise ServiceError(
                f"already running as pid {holder} (pidfile {self.path}); stop it first, or "
                f"remove the pidfile if that process is not Ays"
            )
        self.write(pid)

    def write(self, pid: int) -> None:
        """Make the file hold `pid`, atomically."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            try:
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    os.fchmod(f.fileno(), 0o644)
                    f.write(f"{pid}\n")
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        except OSError as err:
            raise ServiceError(
                f"{self.path}: cannot write the pidfile: {err.strerror}; the directory must be "
                "writable by the service's user"
            ) from None

    def remove_if_mine(self, pid: int) -> bool:
        """Remove the file if it still holds `pid` (after a handover it holds the successor)."""
        if self.read() != pid:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        return True

    def remove_stale(self) -> bool:
        """Remove the file if it names no live process; True when it did."""
        if not self.path.exists() or self.running() is not None:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        return True


def process_alive(pid: int, not_after: float | None = None) -> bool:
    """Whether `pid` is a live process (zombies are dead), started no later than `not_after`
    (a time.time() value) when that is given."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return not_after is None or proc.create_time() <= not_after
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # it exists; another user's process we may not inspect


def still_running(proc: psutil.Process) -> bool:
    """Whether the process `proc` was taken for still runs: psutil compares its start time,
    so a pid recycled by another process reads as gone (zombies are gone too)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True
