"""The node's durable files: directories of JSON records that survive a crash of the node or
its host (the result spool, `spool`, and the run journal, `journal`).

A write is whole or nothing: a temp file `.<name>.<pid>.tmp` in the same directory, fsynced,
renamed into place, the directory fsynced.

Records written together share one file (`GroupFiles`): one fsync for a group of 50 runs
rather than 50. A record is keyed by its run's job-log id; a file is deleted once every
record in it has been dropped. One record alone keeps the plain name `<job_log_id>.json`
(and is replaced by a later single write of the same run); a group is named
`<first id>-<last id>.<pid>-<n>.json`, a name no other write uses.

A dropped record can still be on disk while others of its file are kept, so after a crash
it is read back: each user says why that is harmless (a result sent twice is a duplicate
the manager answers as such; a journaled run already ended is reported once more, and the
manager keeps its first final status).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ays_runtime.exceptions import ConfigError

log = logging.getLogger("ays.node.durable")

Record = dict[str, Any]


@dataclass(frozen=True)
class Group:
    """One file's records, as read back (a single-record file gives one)."""

    path: Path
    records: list[Record]


class GroupFiles:
    """A directory of group files (see the module docstring). `write`, `load`, `drop` and
    `quarantine` do blocking file I/O: call them from a worker thread on an event loop; any
    thread may call them at once."""

    def __init__(self, directory: Path, what: str) -> None:
        self.directory = directory
        self.what = what  # e.g. "node 10.0.0.5:18181: the result spool"
        self._lock = threading.Lock()  # guards the two maps below (not the file I/O)
        self._held: dict[str, set[int]] = {}  # file name -> ids of its records not dropped
        self._where: dict[int, set[str]] = {}  # id -> files holding a record of it
        self._sequence = itertools.count(1)

    def path(self, job_log_id: int) -> Path:
        """Where a record written alone lives."""
        return self.directory / f"{job_log_id}.json"

    def write(self, records: Sequence[tuple[int, Record]]) -> None:
        """Write `records` ((id, record) pairs) durably in one file."""
        if not records:
            return
        ids = [job_log_id for job_log_id, _ in records]
        data: object
        if len(records) == 1:
            path, data = self.path(ids[0]), records[0][1]
        else:
            name = f"{ids[0]}-{ids[-1]}.{os.getpid()}-{next(self._sequence)}.json"
            path, data = self.directory / name, [record for _, record in records]
        write_json(path, data)
        sync_directory(self.directory)
        self._hold(path.name, ids)

    def load(self) -> list[Group]:
        """Create the directory if needed and read every file in it, oldest name first.

        A temp file left by a crash is deleted (its writer died before the rename); one whose
        writer still lives is left alone. A file that cannot be read is renamed to
        `<name>.bad` with a log line, and left for an operator. Nothing read is held for
        `drop` until the caller `adopt`s it (a file of a node process that still runs is
        not this one's).
        """
        groups = []
        for path in sorted(open_directory(self.directory, self.what)):
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                if not writer_alive(path):
                    path.unlink(missing_ok=True)
                continue
            if path.suffix != ".json":
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                records = data if isinstance(data, list) else [data]
                if not records or not all(isinstance(r, dict) for r in records):
                    raise ValueError("not a JSON object or a list of them")
            except (OSError, ValueError) as err:
                self.quarantine(path, err)
                continue
            groups.append(Group(path, records))
        return groups

    def adopt(self, group: Group, ids: Sequence[int]) -> None:
        """Hold a file read by `load` (its records' ids `ids`): it is deleted once each is
        dropped."""
        self._hold(group.path.name, ids)

    def quarantine(self, path: Path, err: object) -> None:
        """Move a file that cannot be used aside, to `<name>.bad`, with a log line."""
        bad = path.with_name(path.name + ".bad")
        os.replace(path, bad)
        with self._lock:
            for job_log_id in self._held.pop(path.name, ()):
                self._where.get(job_log_id, set()).discard(path.name)
        log.error("%s: %s cannot be read (%s); moved it to %s", self.what, path, err, bad)

    def drop(self, job_log_ids: Sequence[int]) -> None:
        """Forget the records of `job_log_ids`; delete each file left with none."""
        for name in self._release(job_log_ids):
            (self.directory / name).unlink(missing_ok=True)

    def _hold(self, name: str, ids: Sequence[int]) -> None:
        with self._lock:
            self._held.setdefault(name, set()).update(ids)
            for job_log_id in ids:
                self._where.setdefault(job_log_id, set()).add(name)

    def _release(self, job_log_ids: Sequence[int]) -> list[str]:
        """The names of the files whose last held record was among `job_log_ids`."""
        emptied = []
        with self._lock:
            for job_log_id in job_log_ids:
                for name in self._where.pop(job_log_id, ()):
                    held = self._held.get(name)
                    if held is None:
                        continue
                    held.discard(job_log_id)
                    if not held:
                        del self._held[name]
                        emptied.append(name)
        return emptied


def open_directory(directory: Path, what: str) -> list[Path]:
    """Create `directory` (0750) if needed and list it; ConfigError naming `what` if the
    node's user cannot."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        return list(directory.iterdir())
    except OSError as err:
        raise ConfigError(
            f"{what} {directory} cannot be used: {err.strerror or err}; node.data_dir must be "
            "a directory the node's user can write (installConfig node creates it)"
        ) from None


def write_json(path: Path, data: object) -> None:
    """Write `data` as JSON to `path` whole or not at all: a temp file `.<name>.<pid>.tmp`
    (see `writer_alive`), fsynced, renamed into place. The caller fsyncs the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writer_alive(temp: Path) -> bool:
    """Whether the process named in a temp file's name (`.<name>.<pid>.tmp`) lives."""
    try:
        pid = int(temp.name.rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
