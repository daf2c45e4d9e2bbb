"""The node's run journal: the process group of every running shell job, on disk, so that a
node killed with `kill -9` (or an OOM kill, or a crash) ends the jobs it left behind when it
starts again. A job must not outlive its node: while it runs unowned, nothing enforces its
timeout, nothing reports it, and the manager may retry the slot elsewhere.

    <node.data_dir>/running/<job_log_id>.json
        {"job_log_id", "task_id", "pid", "pgid", "start_time", "report_to", "started_at",
         "owner_pid", "owner_start_time"}

An entry is written (temp file, fsync, rename, fsync the directory: `durable`; the entries
of runs starting together in one file, `<first id>-<last id>.<pid>-<n>.json`, a JSON list,
with one fsync) twice: ahead of the spawn, without a pid (`pid` 0, `start_time` the wall
clock just before: a node killed right after the spawn, before its second write, still
leaves the run's entry behind), and as soon as the job's shell is spawned, with its pid (the
entry with a pid wins over the one written ahead). It is removed once the run's result is in
the result spool: from then on the spool speaks for the run. A file is deleted once each of
its entries is removed; after a crash, an entry removed while others of its file were kept
is read back and its run reported failed: the manager, which has the run's final status
already, keeps that. `start_time` is the kernel's start time of the shell (psutil's
`create_time`): a pid is recycled, a (pid, start time) pair is not.

At start, before it serves, the node reads the journal and ends what survived of each run
whose owner (the node process that started it) is dead (`reap`): SIGTERM (and SIGCONT) to
each survivor, SIGKILL after the kill grace. An entry whose owner lives is left alone: during
a reload the old process still runs its jobs while the new one starts, and two nodes may
share a data dir. A survivor is
- the shell itself, if its pid still has the recorded start time (if the pid now belongs to
  a process started at another time, the job's group had ended entirely before the pid was
  handed out again, since Linux reuses no id still naming a process group: nothing is
  touched);
- any process of the job's process group, when the shell lives; when the shell is gone, a
  member only if it started after the shell and its environment names the run (AYS_JOB_ID,
  AYS_TASK_ID), so that a group of someone else's under a recycled id is never hit.
- for an entry written ahead (no pid), any process started after it whose environment names
  the run.
A process that left the group with setsid and lost its parent cannot be found this way (as
for the executor: the one way out); under systemd the unit's control group covers it.

The node then reports each journaled run that has no result in the spool as failed (the
run may be retried per its task's policy: its processes are gone now).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from ays_runtime.node.durable import GroupFiles

log = logging.getLogger("ays.node.journal")

RUNNING_DIR = "running"
# psutil's create_time comes from /proc in clock ticks (1/100 s) plus the boot time, which
# psutil reads once: the same process reads back within this.
START_TIME_SLACK = 0.05
AHEAD_SLACK = 2.0
SIGKILL_WAIT = 5.0  # as the executor's: a process in uninterruptible sleep dies when it can


@dataclass(frozen=True)
class JournalEntry:
    """A shell job's process group, and where its result goes."""

    job_log_id: int
    task_id: int
    pid: int  # the job's shell, leader of its own session and process group
    pgid: int
    start_time: float  # psutil.Process(pid).create_time(), seconds since the epoch
    report_to: str
    started_at: str  # ISO 8601, naive UTC
    owner_pid: int = 0  # the node process that started it
    owner_start_time: float = 0.0

    @classmethod
    def of(
        cls, job_log_id: int, task_id: int, pid: int, report_to: str, started_at: str
    ) -> JournalEntry | None:
        """The entry of a job whose shell `pid` was just spawned (start_new_session: it leads
        its group); None if the process is already gone (reaped: nothing to journal)."""
        start_time = _start_time(pid)
        if start_time is None:
            return None
        owner = os.getpid()
        return cls(
            job_log_id,
            task_id,
            pid,
            pid,
            start_time,
            report_to,
            started_at,
            owner,
            _owner_start_time(owner),
        )

    @classmethod
    def ahead(cls, job_log_id: int, task_id: int, report_to: str, started_at: str) -> JournalEntry:
        """The entry of a job about to be spawned: no pid yet; its processes are those started
        from now on whose environment names the run."""
        owner = os.getpid()
        # psutil's create_time counts from the boot time in whole seconds (/proc/stat's btime):
        # against the wall clock it may be up to a second off. The environment names the run.
        since = time.time() - AHEAD_SLACK
        return cls(
            job_log_id,
            task_id,
            0,
            0,
            since,
            report_to,
            started_at,
            owner,
            _owner_start_time(owner),
        )

    def owner_lives(self) -> bool:
        """Whether the node process that started the run is still alive (its pid with the
        recorded start time; a later process that got its pid is not it)."""
        start = _start_time(self.owner_pid)
        return start is not None and abs(start - self.owner_start_time) <= START_TIME_SLACK


@dataclass(frozen=True)
class Reaped:
    """What `reap` found of one journaled run."""

    entry: JournalEntry
    survivors: int  # processes of the run still alive at the node's start
    how: str  # "SIGTERM" or "SIGKILL after Ns grace"; "" when there were none


class RunJournal:
    """The running/ directory. Every method does blocking file I/O or waits: call them from
    a worker thread on an event loop."""

    def __init__(self, directory: Path, who: str = "node") -> None:
        self.directory = directory
        self.who = who
        self._files = GroupFiles(directory, f"{who}: the run journal")

    def path(self, job_log_id: int) -> Path:
        """Where an entry written alone lives."""
        return self._files.path(job_log_id)

    def load(self) -> list[JournalEntry]:
        """Create the directory if needed and read every entry whose owner is dead (a crash's
        temp files are deleted; an unreadable file is renamed to `<name>.bad` with a log
        line). A run journaled twice gives its entry with a pid."""
        found: dict[int, JournalEntry] = {}
        for group in self._files.load():
            try:
                entries = [JournalEntry(**record) for record in group.records]
            except TypeError as err:
                self._files.quarantine(group.path, err)
                continue
            if entries[0].owner_lives():  # one process writes a file: its entries' owner
                continue
            self._files.adopt(group, [entry.job_log_id for entry in entries])
            for entry in entries:
                if entry.pid or entry.job_log_id not in found:
                    found[entry.job_log_id] = entry
        return [found[job_log_id] for job_log_id in sorted(found)]

    def record(self, entry: JournalEntry) -> None:
        """Write the entry durably (temp file, fsync, rename, fsync the directory)."""
        self.record_many([entry])

    def record_many(self, entries: Sequence[JournalEntry]) -> list[None]:
        """`record` for several entries, in one file with one fsync (the node's group commit
        of runs starting together)."""
        self._files.write([(entry.job_log_id, asdict(entry)) for entry in entries])
        return [None] * len(entries)

    def remove(self, job_log_id: int) -> None:
        self.remove_many([job_log_id])

    def remove_many(self, job_log_ids: Sequence[int]) -> list[None]:
        self._files.drop(job_log_ids)
        return [None] * len(job_log_ids)

    def reap(self, entries: list[JournalEntry], kill_grace: float) -> list[Reaped]:
        """End what survived of each entry's run (see the module docstring); wait at most
        `kill_grace` after SIGTERM, then SIGKILL the rest."""
        if not entries:
            return []
        host = _snapshot()  # one look at the host's processes, whatever the entries' count
        found = {entry.job_log_id: survivors(entry, host) for entry in entries}
        alive = [proc for procs in found.values() for proc in procs]
        how = ""
        if alive:
            for sig in (signal.SIGTERM, signal.SIGCONT):
                _send(alive, sig)
            how = "SIGTERM"
            _, alive = psutil.wait_procs(alive, timeout=kill_grace)
            if alive:
                _send(alive, signal.SIGKILL)
                how = f"SIGKILL after {kill_grace:g}s grace"
                _, alive = psutil.wait_procs(alive, timeout=SIGKILL_WAIT)
            for proc in alive:
                log.error("%s: process %d survived SIGKILL", self.who, proc.pid)
        reaped = []
        for entry in entries:
            count = len(found[entry.job_log_id])
            reaped.append(Reaped(entry, count, how if count else ""))
            if count:
                log.warning(
                    "%s: run %d (task %d): %d process(es) outlived the node's last process: "
                    "ended (%s)",
                    self.who,
                    entry.job_log_id,
                    entry.task_id,
                    count,
                    how,
                )
        return reaped


@dataclass
class _Process:
    """A live process of the host, as `reap` saw it once: its group and start time, and its
    environment when first asked (read from /proc, so only for the few that may be a run's)."""

    proc: psutil.Process
    pgid: int
    started: float
    _env: dict[str, str] | None = None

    def names_run(self, entry: JournalEntry) -> bool:
        """Whether it started after the run's shell and its environment names the run."""
        if self.started < entry.start_time - START_TIME_SLACK:
            return False
        if self._env is None:
            try:
                self._env = self.proc.environ()
            except (OSError, psutil.Error):
                self._env = {}  # gone meanwhile, or not ours to read
        return self._env.get("AYS_JOB_ID") == str(entry.job_log_id) and self._env.get(
            "AYS_TASK_ID"
        ) == str(entry.task_id)


def _snapshot() -> list[_Process]:
    """The host's live (not zombie) processes, with their groups and start times."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found.append(_Process(proc, os.getpgid(proc.pid), proc.create_time()))
        except (OSError, psutil.Error):
            continue  # gone meanwhile, or not ours to read
    return found


def survivors(entry: JournalEntry, host: list[_Process]) -> list[psutil.Process]:
    """The live processes of the run `entry` journaled, among `host`'s; never a process of
    someone else's."""
    if entry.pid == 0:  # written ahead of the spawn: the run's own processes, wherever they are
        return [p.proc for p in host if p.names_run(entry)]
    try:
        leader = psutil.Process(entry.pid)
        leader_lives = abs(leader.create_time() - entry.start_time) <= START_TIME_SLACK
        if not leader_lives:
            log.info(
                "run %d: pid %d now belongs to another process (started at another time): "
                "left alone",
                entry.job_log_id,
                entry.pid,
            )
            return []  # the group had ended before the pid was handed out again
    except psutil.NoSuchProcess:
        leader_lives = False
    except psutil.Error:
        return []
    return [p.proc for p in host if p.pgid == entry.pgid and (leader_lives or p.names_run(entry))]


@functools.lru_cache(maxsize=1)
def _owner_start_time(pid: int) -> float:
    """The start time of node process `pid`, this one: read once, not per run."""
    return _start_time(pid) or 0.0


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _send(procs: list[psutil.Process], sig: signal.Signals) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)  # psutil refuses a pid that was reused meanwhile
        except psutil.Error:
            continue
