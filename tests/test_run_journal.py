"""The node's run journal (`node/journal.py`) on real processes: what survived of a journaled
job is ended, and nothing else is, whatever became of the pids in between."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from ays_runtime.node.journal import JournalEntry, RunJournal
from tests.daemons import wait_for

GONE_PID = 4_194_304 + 1  # above Linux's largest pid_max: never a process


@pytest.fixture
def spawned(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts, each in its own session (as the executor starts jobs); what
    is left of their groups is killed afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        try:
            os.killpg(proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(5)
    _kill_marked(str(tmp_path))


def _kill_marked(marker: str) -> None:
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or []):
            proc.kill()


def start(
    procs: list[subprocess.Popen[bytes]], command: str, job_id: int = 7, task_id: int = 3
) -> subprocess.Popen[bytes]:
    env = {"PATH": os.environ["PATH"], "AYS_JOB_ID": str(job_id), "AYS_TASK_ID": str(task_id)}
    proc = subprocess.Popen(["/bin/sh", "-c", command], env=env, start_new_session=True)
    procs.append(proc)
    return proc


def entry_of(pid: int, start_time: float | None = None, **fields: object) -> JournalEntry:
    values = {
        "job_log_id": 7,
        "task_id": 3,
        "pid": pid,
        "pgid": pid,
        "start_time": psutil.Process(pid).create_time() if start_time is None else start_time,
        "report_to": "http://127.0.0.1:1",
        "started_at": "2026-12-04T20:00:00",
        "owner_pid": GONE_PID,  # the node process that crashed
        "owner_start_time": 1.0,
    } | fields
    return JournalEntry(**values)  # type: ignore[arg-type]


def written_ahead(job_log_id: int) -> JournalEntry:
    """The entry a node, dead since, wrote ahead of spawning run `job_log_id` (task 3)."""
    ahead = JournalEntry.ahead(job_log_id, 3, "http://127.0.0.1:1", "2026-12-04T20:00:00")
    return replace(ahead, owner_pid=GONE_PID, owner_start_time=1.0)


def marked(marker: str) -> list[psutil.Process]:
    """Live processes whose command line holds `marker`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if any(marker in part for part in proc.info["cmdline"] or []) and (
            proc.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append(proc)
    return found


def test_a_journaled_job_and_its_children_left_running_are_ended_and_the_entry_read_back(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    journal = RunJournal(tmp_path / "running")
    journal.load()  # creates the directory
    mark = str(tmp_path)
    # The marker is in each shell's command line (sleep takes no extra argument).
    job = start(spawned, f"sh -c 'sleep 300; :' {mark} & sh -c 'sleep 301; :' {mark} & sleep 302")
    wait_for(lambda: len(marked(mark)) >= 3, 30, "the job's shells")
    journal.record(entry_of(job.pid))

    entries = journal.load()
    assert [e.job_log_id for e in entries] == [7]
    (reaped,) = journal.reap(entries, kill_grace=2)

    assert reaped.survivors >= 6 and reaped.how  # three shells, three sleeps
    wait_for(lambda: not marked(mark), 30, "no process of the job left")


def test_a_recycled_pid_with_another_start_time_is_never_signalled(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    journal = RunJournal(tmp_path / "running")
    journal.load()
    stranger = start(spawned, f"sleep 300; : {tmp_path}")  # holds the pid the job had
    real_start = psutil.Process(stranger.pid).create_time()
    journal.record(entry_of(stranger.pid, start_time=real_start - 100))

    (reaped,) = journal.reap(journal.load(), kill_grace=1)

    assert reaped.survivors == 0
    time.sleep(0.5)
    assert stranger.poll() is None  # alive and untouched


def test_when_the_jobs_shell_is_gone_only_group_members_naming_the_run_are_ended(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    journal = RunJournal(tmp_path / "running")
    journal.load()
    ours, theirs = f"{tmp_path}/ours", f"{tmp_path}/theirs"
    job = start(
        spawned, f"sh -c 'sleep 300; :' {ours} & AYS_JOB_ID=999 sh -c 'sleep 300; :' {theirs} &"
    )
    entry = entry_of(job.pid)
    journal.record(entry)
    job.wait(30)  # the shell ends; the sleeps stay in its process group
    wait_for(lambda: marked(ours) and marked(theirs), 30, "both sleeps")

    (reaped,) = journal.reap(journal.load(), kill_grace=1)

    assert reaped.survivors == 2  # the shell and its sleep
    wait_for(lambda: not marked(ours), 30, "the run's sleep ended")
    assert marked(theirs)  # same group, but its environment names another run


def test_an_entry_whose_node_process_still_lives_is_left_to_it(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    journal = RunJournal(tmp_path / "running")
    journal.load()
    old_node = start(spawned, f"sleep 300; : {tmp_path}")  # e.g. the old process of a reload
    job = start(spawned, f"sleep 300; : {tmp_path}/job")
    owner_start = psutil.Process(old_node.pid).create_time()
    journal.record(entry_of(job.pid, owner_pid=old_node.pid, owner_start_time=owner_start))

    assert journal.load() == []
    assert journal.path(7).exists()


def test_an_entry_written_ahead_of_the_spawn_ends_the_runs_processes_and_no_other(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    # The node died after spawning the job's shell but before journaling its pid: the entry
    # written ahead names the run, and the run's processes are found by their environment.
    journal = RunJournal(tmp_path / "running")
    journal.load()
    journal.record(written_ahead(7))
    ours, theirs = f"{tmp_path}/ours", f"{tmp_path}/theirs"
    start(spawned, f"sh -c 'sleep 300; :' {ours} & sleep 301; : {ours}")
    start(spawned, f"sleep 300; : {theirs}", job_id=8)  # another run, started after the entry
    wait_for(lambda: len(marked(ours)) >= 2 and marked(theirs), 30, "both runs' processes")

    (reaped,) = journal.reap(journal.load(), kill_grace=1)

    assert reaped.survivors >= 3  # the shell, its child shell and their sleeps
    wait_for(lambda: not marked(ours), 30, "the run's processes ended")
    assert marked(theirs)


def test_a_journal_of_many_runs_ends_the_processes_of_each_and_of_no_other(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    # A node killed in a burst leaves a group file of runs written ahead: most ended long
    # since, a few still run. One look at the host's processes serves them all.
    journal = RunJournal(tmp_path / "running")
    journal.load()
    journal.record_many([written_ahead(i) for i in range(100, 300)])
    first, last, other = f"{tmp_path}/first", f"{tmp_path}/last", f"{tmp_path}/other"
    start(spawned, f"sleep 300; : {first}", job_id=100)
    start(spawned, f"sh -c 'sleep 300; :' {last} & sleep 301; : {last}", job_id=299)
    start(spawned, f"sleep 300; : {other}", job_id=300)  # a run the journal does not name
    wait_for(lambda: marked(first) and len(marked(last)) >= 2 and marked(other), 30, "runs")

    reaped = {r.entry.job_log_id: r for r in journal.reap(journal.load(), kill_grace=1)}

    assert len(reaped) == 200
    assert reaped[100].survivors >= 2 and reaped[299].survivors >= 3
    assert sum(r.survivors for r in reaped.values()) == (
        reaped[100].survivors + reaped[299].survivors
    )
    wait_for(lambda: not marked(first) and not marked(last), 30, "the runs' processes ended")
    assert marked(other)
