"""A run's transitions after its slot is claimed (`RunTracker`), and the group commit under
them: a burst of dispatches or results shares one transaction, and each caller still gets its
own answer. Database tests run on SQLite and on MariaDB (the `engine` fixture)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, select, update

from ays_runtime.manager.liveness import adopt_from_silent, record_alive
from ays_runtime.manager.runs import (
    LOST_RUN_GRACE,
    LOST_RUN_HOLD,
    RunTracker,
    _Final,
    _update_runs,
)
from ays_runtime.protocol import JobResultReport
from ays_runtime.scheduler.firing import Fire, claim_slots
from ays_runtime.storage.database import make_engine, utcnow
from ays_runtime.storage.group_commit import GroupCommit
from ays_runtime.storage.models import JobLog, Manager, RunStatus, Task
from ays_runtime.transport.base import JobDispatch
from tests.test_scheduler import MANAGER, add_task


@pytest.fixture
def commits(engine: Engine) -> Iterator[list[int]]:
    """One entry per COMMIT the engine runs."""
    seen: list[int] = []

    def record(_conn: object) -> None:
        seen.append(1)

    event.listen(engine, "commit", record)
    yield seen
    event.remove(engine, "commit", record)


def claimed_runs(engine: Engine, count: int, **task: object) -> list[JobDispatch]:
    task_id = add_task(engine, "burst", **task)
    start = utcnow().replace(microsecond=0)
    fires = [Fire(task_id, start + timedelta(seconds=i)) for i in range(count)]
    return claim_slots(engine, MANAGER, fires, utcnow())


def tracker(engine: Engine, redispatched: list[JobDispatch]) -> RunTracker:
    async def redispatch(jobs: list[JobDispatch]) -> None:
        redispatched.extend(jobs)

    return RunTracker(engine, MANAGER, excerpt_bytes=1024, redispatch=redispatch)


def report(
    job: JobDispatch, status: str = RunStatus.SUCCEEDED.value, **extra: object
) -> JobResultReport:
    now = utcnow()
    values = {"exit_code": 0, "started_at": now, "ended_at": now, "output": "ok\n"} | extra
    return JobResultReport(job_log_id=job.job_log_id, node="127.0.0.1:1", status=status, **values)


def statuses(engine: Engine) -> dict[int, tuple[str, str | None]]:
    with engine.connect() as conn:
        return {
            r.id: (r.status, r.node)
            for r in conn.execute(select(JobLog.id, JobLog.status, JobLog.node))
        }


def test_a_burst_of_results_is_stored_in_one_commit_each_answered_on_its_own(
    engine: Engine, commits: list[int]
) -> None:
    jobs = claimed_runs(engine, 40)
    runs = tracker(engine, [])
    commits.clear()

    async def burst() -> list[bool]:
        reports = [report(job) for job in jobs] + [report(jobs[0], output="again")]
        return await asyncio.gather(*(runs.record_result(r) for r in reports))

    answers = asyncio.run(burst())
    assert answers == [True] * 40 + [False]  # the second report of run 0 is a duplicate
    assert len(commits) == 1
    stored = statuses(engine)
    assert {stored[job.job_log_id][0] for job in jobs} == {RunStatus.SUCCEEDED.value}
    with engine.connect() as conn:
        output = conn.scalar(select(JobLog.output).where(JobLog.id == jobs[0].job_log_id))
    assert output == "ok\n"  # the first report won


def test_a_batch_of_finals_gets_for_each_the_answer_its_own_guarded_update_would_give(
    engine: Engine,
) -> None:
    """One batch mixing every case of the guard: a run already final, a run another node
    holds, one reported twice (the first report counts), dispatch failures of a run not
    started and of one started, a lost node's run, a run no node has started yet, an unknown
    id. Each answer (stored, retry, delay, children) is the one the run's own guarded UPDATE
    gave when the finals were written one by one."""
    n1, n2 = "10.0.0.1:1", "10.0.0.2:1"
    r0, r1, r2, r3, r4, r5, r6, r7 = claimed_runs(engine, 8, retry_count=1, retry_interval_s=5)
    now = utcnow()
    with engine.begin() as conn:
        for job, status, node in [
            (r0, "running", n1),
            (r1, "killed", n1),
            (r2, "running", n2),
            (r3, "running", n1),
            (r5, "running", n1),
            (r6, "running", n1),
            (r7, "dispatched", n2),
        ]:
            conn.execute(
                update(JobLog)
                .where(JobLog.id == job.job_log_id)
                .values(status=status, node=node, started_at=now)
            )
    finals = [
        _Final(r3.job_log_id, "succeeded", "", n1, 0, now, now, "first"),
        _Final(r0.job_log_id, "succeeded", "", n1, 0, now, now, "ok"),
        _Final(r1.job_log_id, "succeeded", "", n1, 0, now, now, "late"),
        _Final(r2.job_log_id, "failed", "", n1, 1, now, now, "not its"),
        _Final(r3.job_log_id, "failed", "", n1, 1, now, now, "second"),
        _Final(r4.job_log_id, "failed", "dispatch failed", unstarted=True),
        _Final(r5.job_log_id, "failed", "dispatch failed", unstarted=True),
        _Final(r6.job_log_id, "node_lost", f"node {n1} lost", node=n1),
        _Final(r7.job_log_id, "succeeded", "", n1, 0, now, now, "ok", result='{"a": 1}'),
        _Final(999_999, "succeeded", "", n1, 0, now, now, "unknown"),
    ]
    stored: list[int] = []
    runs = tracker(engine, [])
    runs.on_stored = stored.extend
    answers = runs._write_finals(finals)

    stored_answers = [True, True, False, False, False, True, False, True, True, False]
    assert [a[0] for a in answers] == stored_answers
    assert [a[1] is not None for a in answers] == [False] * 5 + [True, False, True, False, False]
    assert [a[2] for a in answers] == [0.0] * 5 + [5.0, 0.0, LOST_RUN_HOLD, 0.0, 0.0]
    assert [a[3] for a in answers] == [[]] * len(finals)
    retries = [(a[1].task_id, a[1].scheduled_at, a[1].attempt) for a in answers if a[1]]
    assert retries == [(r4.task_id, r4.scheduled_at, 1), (r6.task_id, r6.scheduled_at, 1)]
    assert stored == [r3.job_log_id, r0.job_log_id, r4.job_log_id, r6.job_log_id, r7.job_log_id]
    with engine.connect() as conn:
        rows = {
            r.id: (r.status, r.node, r.output, r.result)
            for r in conn.execute(
                select(JobLog.id, JobLog.status, JobLog.node, JobLog.output, JobLog.result)
            )
        }
    assert rows[r0.job_log_id] == ("succeeded", n1, "ok", None)
    assert rows[r1.job_log_id][0] == "killed"
    assert rows[r2.job_log_id] == ("running", n2, "", None)
    assert rows[r3.job_log_id] == ("succeeded", n1, "first", None)
    assert rows[r4.job_log_id][0] == "failed"
    assert rows[r5.job_log_id] == ("running", n1, "", None)
    assert rows[r6.job_log_id][:2] == ("node_lost", n1)
    assert rows[r7.job_log_id] == ("succeeded", n1, "ok", '{"a": 1}')
    assert len(rows) == 10  # the eight runs and the two retries


def test_the_update_of_many_runs_gives_each_run_its_own_values_however_it_is_cut(
    engine: Engine,
) -> None:
    """The finals' one UPDATE of many rows per set of columns (on MySQL a statement joining a
    derived table of the rows, cut at 500 rows and at 512 Ki characters of text): each run
    gets exactly its own values, datetimes to the microsecond, NULLs, text that is not ASCII,
    in batches that are cut both ways; a run not in the batch is left as it was."""
    jobs = claimed_runs(engine, 1204)
    untouched = jobs.pop()
    base = utcnow()
    writes: dict[int, dict[str, Any]] = {}
    for i, job in enumerate(jobs):
        values: dict[str, Any] = {
            "status": RunStatus.SUCCEEDED.value if i % 2 else RunStatus.FAILED.value,
            "message": f"run {i}: fini, 完了",
            "ended_at": base + timedelta(microseconds=1001 * i),
            "exit_code": None if i % 7 == 0 else i,
            "output": f"line {i}\n" * (i % 5),
        }
        if i % 3 == 0:  # a second set of columns
            values |= {"node": f"10.0.0.{i % 250}:18181", "started_at": base - timedelta(i)}
        if i % 4 == 1:  # more sets: data for children, with quotes, a backslash, an emoji
            values["result"] = json.dumps({"i": i, "say": 'a "b" \\ c 😀'}, ensure_ascii=False)
        if 100 <= i < 130:  # 30 x 20,000 characters: more text than one statement takes
            values["output"] = "é" * 20_000
        writes[job.job_log_id] = values
    with engine.connect() as conn:
        before = conn.execute(select(JobLog).where(JobLog.id == untouched.job_log_id)).one()
    with engine.begin() as conn:
        _update_runs(conn, writes)
    with engine.connect() as conn:
        rows = {row.id: row for row in conn.execute(select(JobLog))}
    for job_id, values in writes.items():
        assert {c: getattr(rows[job_id], c) for c in values} == values, job_id
    assert rows[untouched.job_log_id] == before


def test_a_burst_of_dispatches_is_one_commit_and_each_row_names_its_node(
    engine: Engine, commits: list[int]
) -> None:
    jobs = claimed_runs(engine, 30)
    runs = tracker(engine, [])
    commits.clear()

    async def burst() -> None:
        await asyncio.gather(
            *(runs.dispatched(job, f"127.0.0.1:{1 + i % 2}") for i, job in enumerate(jobs))
        )

    asyncio.run(burst())
    assert len(commits) == 1
    stored = statuses(engine)
    for i, job in enumerate(jobs):
        assert stored[job.job_log_id] == (RunStatus.DISPATCHED.value, f"127.0.0.1:{1 + i % 2}")


def test_a_failed_run_in_a_burst_is_retried_and_the_others_are_not(engine: Engine) -> None:
    jobs = claimed_runs(engine, 5, retry_count=1, retry_interval_s=0)
    redispatched: list[JobDispatch] = []
    runs = tracker(engine, redispatched)

    async def burst() -> list[bool]:
        reports = [report(job) for job in jobs[1:]]
        reports.append(report(jobs[0], RunStatus.FAILED.value, exit_code=1))
        answers = await asyncio.gather(*(runs.record_result(r) for r in reports))
        for _ in range(100):  # the retry is claimed in a worker thread: bounded wait
            if redispatched:
                break
            await asyncio.sleep(0.05)
        await runs.stop()
        return answers

    assert asyncio.run(burst()) == [True] * 5
    assert [(j.task_id, j.scheduled_at, j.attempt) for j in redispatched] == [
        (jobs[0].task_id, jobs[0].scheduled_at, 1)
    ]


def test_a_failed_group_write_fails_every_caller_of_that_batch_and_the_next_batch_runs() -> None:
    batches: list[list[int]] = []

    def write(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        if 13 in items:
            raise RuntimeError("disk full")
        return [item * 2 for item in items]

    async def scenario() -> tuple[list[object], list[object]]:
        group: GroupCommit[int, int] = GroupCommit(write, max_batch=4)
        first = await asyncio.gather(
            *(group.submit(i) for i in (11, 12, 13, 14, 15)), return_exceptions=True
        )
        second = await asyncio.gather(*(group.submit(i) for i in (1, 2)), return_exceptions=True)
        return first, second

    first, second = asyncio.run(scenario())
    assert batches == [[11, 12, 13, 14], [15], [1, 2]]
    assert [str(a) if isinstance(a, Exception) else a for a in first] == [
        "disk full",
        "disk full",
        "disk full",
        "disk full",
        30,
    ]
    assert second == [2, 4]


def test_items_submitted_while_a_batch_is_written_go_into_the_next_one() -> None:
    batches: list[list[str]] = []

    def write(items: Sequence[str]) -> list[str]:
        batches.append(list(items))
        return [item.upper() for item in items]

    async def scenario() -> list[str]:
        group: GroupCommit[str, str] = GroupCommit(write)
        first = asyncio.ensure_future(group.submit("a"))
        await asyncio.sleep(0)  # the writer has taken ["a"] and is in its thread
        later = await asyncio.gather(group.submit("b"), group.submit("c"))
        return [await first, *later]

    assert asyncio.run(scenario()) == ["A", "B", "C"]
    assert batches == [["a"], ["b", "c"]]


def test_a_retry_is_a_pending_row_from_the_failure_on_and_a_restarted_tracker_sends_it_when_due(
    engine: Engine,
) -> None:
    jobs = claimed_runs(engine, 1, retry_count=2, retry_interval_s=1.5)
    failed_at = utcnow()

    async def fail_then_stop() -> None:
        runs = tracker(engine, [])
        assert await runs.record_result(report(jobs[0], RunStatus.FAILED.value, exit_code=3))
        await runs.stop()  # the manager stops while the retry waits

    asyncio.run(fail_then_stop())
    with engine.connect() as conn:
        retry = conn.execute(select(JobLog).where(JobLog.attempt == 1)).one()
    assert (retry.status, retry.trigger, retry.scheduled_at) == (
        RunStatus.PENDING.value,
        "retry",
        jobs[0].scheduled_at,
    )
    assert retry.due_at is not None
    assert timedelta(seconds=1.4) <= retry.due_at - failed_at <= timedelta(seconds=3)

    async def restart() -> tuple[list[JobDispatch], list[JobDispatch], float]:
        redispatched: list[JobDispatch] = []
        runs = tracker(engine, redispatched)
        assert await runs.recover_pending() == 1
        at_start = list(redispatched)  # not due yet: nothing sent
        for _ in range(100):  # bounded: 5 s
            if redispatched:
                break
            await asyncio.sleep(0.05)
        sent_at = utcnow()
        await runs.stop()
        return at_start, redispatched, (sent_at - retry.due_at).total_seconds()

    at_start, sent, late = asyncio.run(restart())
    assert at_start == []
    assert [(j.job_log_id, j.attempt) for j in sent] == [(retry.id, 1)]
    assert -0.05 <= late < 2.0  # sent once due, not before


def test_a_retry_whose_task_was_disabled_while_it_waited_is_skipped_with_the_reason(
    engine: Engine,
) -> None:
    jobs = claimed_runs(engine, 1, retry_count=1, retry_interval_s=0.2)
    redispatched: list[JobDispatch] = []

    async def scenario() -> None:
        runs = tracker(engine, redispatched)
        await runs.record_result(report(jobs[0], RunStatus.FAILED.value, exit_code=1))
        with engine.begin() as conn:
            conn.execute(update(Task).where(Task.id == jobs[0].task_id).values(enabled=False))
        for _ in range(60):  # bounded: 3 s
            with engine.connect() as conn:
                status = conn.scalar(select(JobLog.status).where(JobLog.attempt == 1))
            if status == RunStatus.SKIPPED.value:
                break
            await asyncio.sleep(0.05)
        await runs.stop()

    asyncio.run(scenario())
    assert redispatched == []
    with engine.connect() as conn:
        retry = conn.execute(select(JobLog).where(JobLog.attempt == 1)).one()
    assert retry.status == RunStatus.SKIPPED.value
    assert "disabled" in retry.message


NODE = "127.0.0.1:1"


async def _dispatch_and_lose(runs: RunTracker, job: JobDispatch) -> None:
    await runs.dispatched(job, NODE)
    await runs.node_lost(NODE)


def _retry_row(engine: Engine) -> JobLog:
    with engine.connect() as conn:
        return conn.execute(select(JobLog).where(JobLog.attempt == 1)).one()  # type: ignore[return-value]


async def _until(predicate: object, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.05)):  # bounded
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)


def test_a_lost_runs_retry_is_held_until_its_node_reports_the_run_ended_then_goes_at_once(
    engine: Engine,
) -> None:
    (job,) = claimed_runs(engine, 1, retry_count=1, retry_interval_s=0)
    redispatched: list[JobDispatch] = []

    async def scenario() -> JobLog:
        runs = tracker(engine, redispatched)
        await _dispatch_and_lose(runs, job)
        await asyncio.sleep(0.5)  # a retry due at once would be sent by now
        held = _retry_row(engine)
        assert redispatched == []
        # The node restarted, ended the job its earlier process left, and says so.
        late = report(job, RunStatus.FAILED.value, exit_code=None, message="node restarted")
        assert not await runs.record_result(late)  # the run stays node_lost
        await _until(lambda: redispatched)
        await runs.stop()
        return held

    held = asyncio.run(scenario())
    assert held.status == RunStatus.PENDING.value and held.due_at is not None
    # No timeout: nothing bounds the old process, so the hold is long.
    assert held.due_at - utcnow() > timedelta(seconds=LOST_RUN_HOLD - 60)
    assert [(j.job_log_id, j.attempt) for j in redispatched] == [(held.id, 1)]
    assert statuses(engine)[job.job_log_id][0] == RunStatus.NODE_LOST.value


def test_a_lost_runs_retry_is_held_at_most_until_the_runs_timeout_has_passed(
    engine: Engine,
) -> None:
    (job,) = claimed_runs(engine, 1, retry_count=1, retry_interval_s=0, timeout_s=30)

    async def scenario() -> None:
        runs = tracker(engine, [])
        await _dispatch_and_lose(runs, job)
        await runs.stop()

    asyncio.run(scenario())
    with engine.connect() as conn:
        started = conn.scalar(select(JobLog.started_at).where(JobLog.id == job.job_log_id))
    held = _retry_row(engine)
    assert held.due_at is not None and started is not None
    bound = started + timedelta(seconds=30 + LOST_RUN_GRACE)
    assert abs((held.due_at - bound).total_seconds()) < 2


def test_a_lost_run_its_node_reports_succeeded_after_all_is_not_retried(engine: Engine) -> None:
    (job,) = claimed_runs(engine, 1, retry_count=1, retry_interval_s=0)
    redispatched: list[JobDispatch] = []

    async def scenario() -> None:
        runs = tracker(engine, redispatched)
        await _dispatch_and_lose(runs, job)
        assert not await runs.record_result(report(job))
        await runs.stop()

    asyncio.run(scenario())
    held = _retry_row(engine)
    assert redispatched == []
    assert held.status == RunStatus.SKIPPED.value and "succeeded" in held.message


def test_a_task_allowing_concurrent_retries_retries_a_lost_run_after_its_backoff_alone(
    engine: Engine,
) -> None:
    (job,) = claimed_runs(engine, 1, retry_count=1, retry_interval_s=0, allow_concurrent_retry=True)
    redispatched: list[JobDispatch] = []

    async def scenario() -> None:
        runs = tracker(engine, redispatched)
        await _dispatch_and_lose(runs, job)
        await _until(lambda: redispatched)
        await runs.stop()

    asyncio.run(scenario())
    assert [j.attempt for j in redispatched] == [1]


def test_liveness_rows_refresh_and_only_pending_runs_of_silent_managers_are_adopted(
    engine: Engine,
) -> None:
    started = utcnow()
    record_alive(engine, MANAGER, "1.0", started)
    first = _last_seen(engine, MANAGER)
    record_alive(engine, MANAGER, "1.0", started)  # an update, not a second row
    assert _last_seen(engine, MANAGER) >= first
    record_alive(engine, "10.0.0.2:18080", "1.0", started)
    with engine.begin() as conn:  # silent for 10 minutes
        conn.execute(
            update(Manager)
            .where(Manager.manager_id == "10.0.0.2:18080")
            .values(last_seen=started - timedelta(minutes=10))
        )
    task_id = add_task(engine, "left-behind")
    slot = utcnow().replace(microsecond=0)
    [pending] = claim_slots(engine, "10.0.0.2:18080", [Fire(task_id, slot)], utcnow())
    [finished] = claim_slots(engine, "10.0.0.2:18080", [Fire(task_id, slot, attempt=1)], utcnow())
    with engine.begin() as conn:
        conn.execute(
            update(JobLog).where(JobLog.id == finished.job_log_id).values(status="succeeded")
        )
    assert adopt_from_silent(engine, MANAGER, timedelta(minutes=1)) is not None
    assert adopt_from_silent(engine, MANAGER, timedelta(minutes=1)) is None  # nothing left
    with engine.connect() as conn:
        owners = dict(conn.execute(select(JobLog.id, JobLog.manager_id)).all())
    assert owners == {pending.job_log_id: MANAGER, finished.job_log_id: "10.0.0.2:18080"}
    assert adopt_from_silent(engine, "10.0.0.2:18080", timedelta(minutes=1)) is None  # I'm alive


def _last_seen(engine: Engine, manager_id: str) -> datetime:
    with engine.connect() as conn:
        seen = conn.scalar(select(Manager.last_seen).where(Manager.manager_id == manager_id))
    assert seen is not None
    return seen


def test_a_deadlock_on_mariadb_is_retried_and_every_result_is_stored(
    mysql_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A real deadlock: a rival transaction holds run B; the tracker's transaction (results
    of A and B, one locking read of both) holds A when it waits for B, and the rival then
    asks for A. InnoDB rolls back the smaller transaction, the tracker's (the rival has
    changed many rows), and the tracker writes again once the rival has committed."""
    engine, rival_engine = make_engine(mysql_url), make_engine(mysql_url)
    try:
        runs = claimed_runs(engine, 32)
        first, second, others = runs[0], runs[1], runs[2:]
        asking_for_b = threading.Event()
        rival_failed: list[BaseException] = []

        @event.listens_for(engine, "before_cursor_execute")
        def watch(_c: object, _cur: object, statement: str, params: Any, *_: object) -> None:
            if (
                "FOR UPDATE" in statement
                and isinstance(params, dict)
                and second.job_log_id in params.values()
            ):
                asking_for_b.set()

        def tracker_holds_a() -> None:
            """Until a probe cannot lock A (the read locks A, then waits for B, in one
            statement: asked for A too early, the rival would take A before the tracker)."""
            with rival_engine.connect() as probe:
                for _ in range(3000):
                    free = probe.exec_driver_sql(
                        "SELECT id FROM ays_job_log WHERE id = %s FOR UPDATE SKIP LOCKED",
                        (first.job_log_id,),
                    ).first()
                    probe.rollback()
                    if free is None:
                        return
                    time.sleep(0.01)
            raise AssertionError("the tracker never locked run A")

        def rival(conn: Connection) -> None:
            try:
                assert asking_for_b.wait(30), "the tracker never asked for run B"
                tracker_holds_a()
                conn.execute(
                    update(JobLog).where(JobLog.id == first.job_log_id).values(message="r")
                )
                conn.commit()
            except BaseException as err:  # reported by the test below
                rival_failed.append(err)
                conn.rollback()

        with rival_engine.connect() as conn:
            for job in others:  # one by one: an IN list may scan (and lock) every row
                conn.execute(
                    update(JobLog).where(JobLog.id == job.job_log_id).values(message="rival")
                )
            conn.execute(update(JobLog).where(JobLog.id == second.job_log_id).values(message="r"))
            thread = threading.Thread(target=rival, args=(conn,))
            thread.start()

            async def record() -> list[bool]:
                runs = tracker(engine, [])
                return list(
                    await asyncio.gather(
                        runs.record_result(report(first)), runs.record_result(report(second))
                    )
                )

            with caplog.at_level("WARNING", logger="ays.retry"):
                stored = asyncio.run(record())
            thread.join(30)
        assert rival_failed == []
        assert stored == [True, True]
        found = statuses(engine)
        assert found[first.job_log_id][0] == found[second.job_log_id][0] == "succeeded"
        assert "Deadlock" in caplog.text and "trying again" in caplog.text
    finally:
        engine.dispose()
        rival_engine.dispose()


def test_of_two_claims_of_one_run_one_wins_and_a_report_from_the_loser_ends_nothing(
    engine: Engine,
) -> None:
    job, ended = claimed_runs(engine, 2)

    async def claim() -> list[Any]:
        runs = tracker(engine, [])
        answers = await asyncio.gather(
            runs.claim_start(job.job_log_id, "10.0.0.1:1"),
            runs.claim_start(job.job_log_id, "10.0.0.2:1"),
            runs.claim_start(ended.job_log_id, "10.0.0.1:1"),
            runs.claim_start(999_999, "10.0.0.1:1"),
        )
        discarded = report(job, RunStatus.DISCARDED.value)
        stored = await runs.record_result(discarded.model_copy(update={"node": "10.0.0.2:1"}))
        return [*answers, stored]

    runs = tracker(engine, [])
    asyncio.run(runs.end_killed(ended.job_log_id, "killed before it started"))
    won, lost, of_ended, unknown, loser_report = asyncio.run(claim())
    assert (won.claimed, won.status, won.node) == (True, "running", "10.0.0.1:1")
    assert (lost.claimed, lost.status, lost.node) == (False, "running", "10.0.0.1:1")
    assert (of_ended.claimed, of_ended.status) == (False, "killed")
    assert (unknown.claimed, unknown.status) == (False, "")
    assert loser_report is False
    assert statuses(engine)[job.job_log_id] == ("running", "10.0.0.1:1")
    with engine.connect() as conn:
        assert conn.execute(
            select(JobLog.started_at).where(JobLog.id == job.job_log_id)
        ).scalar_one()


def test_a_dispatch_failure_recorded_after_a_node_started_the_run_ends_nothing(
    engine: Engine,
) -> None:
    """The transport gave up on a hand-over (a timeout: the node may have had it) but the
    node had already claimed the run's start: the run is that node's; failing it would also
    retry it beside the run still going."""
    (job,) = claimed_runs(engine, 1, retry_count=1, retry_interval_s=0)
    redispatched: list[JobDispatch] = []

    async def scenario() -> Any:
        runs = tracker(engine, redispatched)
        answer = await runs.claim_start(job.job_log_id, "10.0.0.1:1")
        await runs.dispatch_failed(job, "dispatch failed: 10.0.0.1:1: ReadTimeout")
        await runs.stop()
        return answer

    assert asyncio.run(scenario()).claimed
    assert statuses(engine) == {job.job_log_id: ("running", "10.0.0.1:1")}
    assert redispatched == []


@pytest.fixture
def impatient_engine(mysql_url: str) -> Iterator[Engine]:
    """An engine on MariaDB whose connections wait 1 s for a row lock, not 50."""
    engine = make_engine(mysql_url)

    @event.listens_for(engine, "connect")
    def _short_lock_wait(dbapi_conn: Any, _record: object) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("SET SESSION innodb_lock_wait_timeout = 1")

    yield engine
    engine.dispose()


@contextmanager
def rival_holding(engine: Engine, job_log_id: int) -> Iterator[list[BaseException]]:
    """A rival transaction (on an engine of its own) holds run `job_log_id`'s row until
    `engine` has met a lock wait timeout, then commits: the tracker's transaction fails once
    with a transient error and finds the row free when tried again. Yields the rival's
    errors."""
    timed_out = threading.Event()
    failed: list[BaseException] = []

    def saw(context: Any) -> None:
        if getattr(context.original_exception, "args", (None,))[:1] == (1205,):
            timed_out.set()  # 1205: lock wait timeout exceeded

    def commit_after_timeout() -> None:
        try:
            assert timed_out.wait(30), "the tracker never waited for the row"
            conn.commit()
        except BaseException as err:  # reported by the test
            failed.append(err)
            conn.rollback()

    rival_engine = make_engine(engine.url.render_as_string(hide_password=False))
    event.listen(engine, "handle_error", saw)
    try:
        with rival_engine.connect() as conn:
            conn.execute(update(JobLog).where(JobLog.id == job_log_id).values(message="rival"))
            thread = threading.Thread(target=commit_after_timeout)
            thread.start()
            try:
                yield failed
            finally:
                timed_out.set()  # the test failed early: let the rival go
                thread.join(30)
    finally:
        event.remove(engine, "handle_error", saw)
        rival_engine.dispose()


def test_a_retry_decided_while_a_rival_holds_its_row_is_tried_again_and_still_skipped(
    impatient_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry of a task disabled meanwhile is skipped when due; a rival transaction holds
    its row past the lock wait timeout: the decision is tried again, not lost."""
    engine = impatient_engine
    (job,) = claimed_runs(engine, 1, retry_count=1, retry_interval_s=3600)
    redispatched: list[JobDispatch] = []

    async def fail() -> None:
        runs = tracker(engine, redispatched)
        await runs.record_result(report(job, RunStatus.FAILED.value, exit_code=1))
        await runs.stop()  # the retry stays pending, due in an hour

    async def decide() -> None:
        runs = tracker(engine, redispatched)
        assert await runs.recover_pending() == 1
        await _until(lambda: _retry_row(engine).status != RunStatus.PENDING.value, 30)
        await runs.stop()

    asyncio.run(fail())
    held = _retry_row(engine)
    with engine.begin() as conn:
        conn.execute(update(Task).where(Task.id == job.task_id).values(enabled=False))
        soon = utcnow() + timedelta(seconds=1)  # decided by a timer, not sent at start
        conn.execute(update(JobLog).where(JobLog.id == held.id).values(due_at=soon))
    with rival_holding(engine, held.id) as rival_failed, caplog.at_level("WARNING", "ays.retry"):
        asyncio.run(decide())
    assert rival_failed == []
    assert redispatched == []
    retry = _retry_row(engine)
    assert retry.status == RunStatus.SKIPPED.value and "disabled" in retry.message
    assert "Lock wait timeout" in caplog.text and "trying again" in caplog.text


def test_a_held_retry_released_while_a_rival_holds_its_row_is_tried_again_and_sent(
    impatient_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A lost run's node reports it ended: its held retry goes, even though a rival
    transaction holds the retry's row past the lock wait timeout at that moment."""
    engine = impatient_engine
    (job,) = claimed_runs(engine, 1, retry_count=1, retry_interval_s=0)
    redispatched: list[JobDispatch] = []

    async def lose() -> None:
        runs = tracker(engine, [])
        await _dispatch_and_lose(runs, job)
        await runs.stop()  # the retry stays held in the database

    async def release() -> None:
        runs = tracker(engine, redispatched)
        late = report(job, RunStatus.FAILED.value, exit_code=None, message="node restarted")
        assert not await runs.record_result(late)
        await runs.stop()

    asyncio.run(lose())
    held = _retry_row(engine)
    with rival_holding(engine, held.id) as rival_failed, caplog.at_level("WARNING", "ays.retry"):
        asyncio.run(release())
    assert rival_failed == []
    assert [(j.job_log_id, j.attempt) for j in redispatched] == [(held.id, 1)]
    assert "Lock wait timeout" in caplog.text and "trying again" in caplog.text
