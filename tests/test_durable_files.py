"""The node's durable files (`node/durable.py`), through their two users, the result spool and
the run journal: records written together share one file, a file goes once each of its
records is dropped, and what a crash leaves is read back whole."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import psutil

from ays_runtime.node.journal import RunJournal
from ays_runtime.node.spool import ResultSpool, SpooledResult
from ays_runtime.protocol import JobResultReport
from tests.test_run_journal import GONE_PID, written_ahead


def result(job_log_id: int) -> SpooledResult:
    report = JobResultReport(job_log_id=job_log_id, node="127.0.0.1:1", status="succeeded")
    return SpooledResult("http://127.0.0.1:9", report)


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_results_spooled_together_share_one_file_that_goes_with_the_last_of_them(
    tmp_path: Path,
) -> None:
    spool = ResultSpool(tmp_path / "results")
    assert spool.load() == []
    spool.put_many([result(5), result(6), result(9)])
    spool.put(result(11))
    (group,) = [name for name in files(spool.directory) if name != "11.json"]
    assert group.startswith("5-9.") and group.endswith(".json")
    assert files(spool.directory) == sorted([group, "11.json"])

    spool.remove_many([5, 9])
    assert files(spool.directory) == sorted([group, "11.json"])  # 6 is still waiting
    # A crash now: a new process reads back every result on disk, the taken ones too (the
    # manager answers those as duplicates).
    again = ResultSpool(spool.directory)
    assert [entry.job_log_id for entry in again.load()] == [5, 6, 9, 11]

    spool.remove(6)
    spool.remove(11)
    assert files(spool.directory) == []


def test_a_new_process_deletes_a_group_of_adopted_results_once_each_is_taken(
    tmp_path: Path,
) -> None:
    first = ResultSpool(tmp_path / "results")
    first.load()  # creates the directory
    first.put_many([result(1), result(2)])
    spool = ResultSpool(tmp_path / "results")
    assert [entry.report for entry in spool.load()] == [result(1).report, result(2).report]
    spool.remove(2)
    assert len(files(spool.directory)) == 1
    spool.remove(1)
    assert files(spool.directory) == []


def test_an_unreadable_group_file_is_set_aside_whole(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path / "results")
    spool.load()
    (spool.directory / "3-4.1-1.json").write_text('[{"report_to": "x"}, 7]')
    spool.put(result(8))
    assert [entry.job_log_id for entry in spool.load()] == [8]
    assert "3-4.1-1.json.bad" in files(spool.directory)


def test_runs_journaled_together_share_a_file_and_the_entry_with_a_pid_wins(
    tmp_path: Path,
) -> None:
    journal = RunJournal(tmp_path / "running")
    journal.load()
    journal.record_many([written_ahead(20), written_ahead(21), written_ahead(22)])
    journal.record(replace(written_ahead(21), pid=GONE_PID, pgid=GONE_PID, start_time=2.0))
    assert len(files(journal.directory)) == 2  # the group, and 21.json with the pid

    entries = RunJournal(journal.directory).load()
    assert [(e.job_log_id, e.pid) for e in entries] == [(20, 0), (21, GONE_PID), (22, 0)]

    journal.remove_many([20, 21])
    assert len(files(journal.directory)) == 1  # 22 keeps the group
    journal.remove(22)
    assert files(journal.directory) == []


def test_a_group_of_a_node_process_that_still_runs_is_left_to_it(tmp_path: Path) -> None:
    """During a reload the old process still runs its jobs: the new one neither reaps them
    nor deletes their entries."""
    old_node = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = psutil.Process(old_node.pid).create_time()
        entries = [
            replace(written_ahead(i), owner_pid=old_node.pid, owner_start_time=start)
            for i in (30, 31)
        ]
        old_journal = RunJournal(tmp_path / "running")
        old_journal.load()
        old_journal.record_many(entries)
        journal = RunJournal(tmp_path / "running")
        assert journal.load() == []
        journal.remove_many([30, 31])  # not this process's: nothing is deleted
        assert len(files(journal.directory)) == 1
    finally:
        old_node.kill()
        old_node.wait(5)
