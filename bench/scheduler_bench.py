#!/usr/bin/env python
"""Scheduler benchmark: reconcile time, fire lateness, throughput and memory; prints figures.

What it measures (DESIGN.md, "Timer reconciliation"; performance is reported, never asserted):

1. Reconcile time (plan + apply + apply_to_memory, in this thread, with a real TimerList) for
   each size in --reconcile-sizes: the initial install (every task an add), a tick with no
   change (median of 5) and a tick after 1% of the tasks changed version (median of 3).
   Tasks use 3,600 distinct cron schedules (`S M * * * *`).
2. Fire lateness: for each N in --steps, N fresh tasks all `* * * * * *` (due every second),
   the real Scheduler (no-op on_claimed) running for --step-seconds. Per fire:
     claim lateness     = job_log.created_at - scheduled_at (created_at is taken when the
                          writer starts the batch that claims the slot);
     committed lateness = when on_claimed received the slot's dispatch (its row committed)
                          - scheduled_at.
   With --claim-ahead S (default: the manager's `claim_ahead`, 1 s) each slot is claimed up
   to S before it and handed to on_claimed when it comes, never before: claim lateness is
   then negative (claimed ahead) and committed lateness is the wait from the slot to the
   hand-over. --claim-ahead 0 measures claiming at the slot (the claim path's own speed).
   fires/s achieved = job-log rows whose slot lies in the measured window / window length.
   "Sustained" = achieved >= 99% of N and COMMITTED p99 < 100 ms (the claim figure is shown
   beside it and never decides a bar).
2b. Burst (--bursts): N fresh tasks all `S * * * * *` (the same second S of every minute,
   like 50,000 tasks on `0 * * * * *`), so N slots fall due in one second; the real
   Scheduler fires them and the figure is the time from the slot until the last of the N
   rows was committed (handed to on_claimed), with committed and claim p50/p99. The burst
   measured is the one a running manager meets every minute: its timers installed and its
   tasks read (TaskCache.warm) at least BURST_AHEAD + 1 s before the slot, else the next
   minute's is measured.
3. Manager RSS: a child process (clean heap) reconciles the tasks into a TimerList; RSS
   before and after (psutil), for the largest reconcile size and for each lateness step.
4. APScheduler 3.x (AsyncIOScheduler, MemoryJobStore, default AsyncIOExecutor) with the same
   10k jobs (`CronTrigger(second="*")`, a no-op coroutine) in a child process: lateness from
   EVENT_JOB_EXECUTED (listener time - scheduled_run_time) and EVENT_JOB_SUBMITTED, RSS delta;
   ratios Ays/APScheduler. APScheduler writes nothing to a database: a fairness caveat.

Quick run:  .venv/bin/python bench/scheduler_bench.py --step-seconds 5
Full run:   .venv/bin/python bench/scheduler_bench.py --json bench-results.json
MariaDB: --mysql-url (default $AYS_BENCH_MYSQL_URL, else the local ays_test user); a fresh
database ays_t_bench_<hex> is created and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import Engine, create_engine, delete, func, insert, select, update
from sqlalchemy.engine import make_url

from ays_runtime.config import ManagerSettings
from ays_runtime.scheduler.firing import Fire, TaskCache, claim_in
from ays_runtime.scheduler.reconcile import Reconciler, memory_snapshot
from ays_runtime.scheduler.schedule import parse_schedule
from ays_runtime.scheduler.scheduler import BURST_AHEAD, CLAIM_RATE, Scheduler
from ays_runtime.scheduler.timers import Timer, TimerList
from ays_runtime.storage.database import make_engine, redacted, transaction, utcnow
from ays_runtime.storage.migrate import upgrade
from ays_runtime.storage.models import JobLog, NodeGroup, Task, TimerRow, TriggerKind
from ays_runtime.transport.base import JobDispatch

MANAGER = "127.0.0.1:18080"
GROUP = "bench_group"
EVERY_SECOND = "* * * * * *"
DEFAULT_MYSQL_URL = "mysql+pymysql://ays_test:ays_test@127.0.0.1:3306/ays_test"
LATENESS_BAR_MS = 100.0
BURST_BAR_S = 2.0  # 100,000 slots due in one second, all committed (MariaDB)
# Seconds before its slot a fire is claimed (--claim-ahead; the manager's default).
CLAIM_AHEAD: float = ManagerSettings.model_fields["claim_ahead"].default
# The claim rate a crowded second is planned for (--no-burst-ahead: NO_BURST_RATE).
BURST_RATE: float = CLAIM_RATE
# A claim rate no second's slots reach: no second is ever crowded, and every slot is claimed
# CLAIM_AHEAD before it.
NO_BURST_RATE = 1e12
SUSTAINED_SHARE = 0.99
MB = 1024 * 1024


# --- small helpers ----------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def lateness_stats(values_ms: list[float]) -> dict[str, float]:
    return {
        "count": len(values_ms),
        "p50_ms": percentile(values_ms, 50),
        "p99_ms": percentile(values_ms, 99),
        "max_ms": max(values_ms) if values_ms else math.nan,
    }


def burst_ahead_note() -> str:
    if BURST_RATE >= NO_BURST_RATE:
        return " (a crowded second too: --no-burst-ahead)"
    return f", a crowded second up to {BURST_AHEAD.total_seconds():g} s"


def rss() -> int:
    return psutil.Process().memory_info().rss


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} CPUs)"


def fmt(value: float, digits: int = 1) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:,.{digits}f}")
    )


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def db_server_process() -> psutil.Process | None:
    """The local MariaDB/MySQL server process, to report its CPU share (None if not visible)."""
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in ("mariadbd", "mysqld"):
            return proc
    return None


def cpu_seconds(proc: psutil.Process | None) -> float:
    if proc is None:
        return math.nan
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return math.nan
    return times.user + times.system


# --- databases --------------------------------------------------------------------------------


@contextlib.contextmanager
def database(backend: str, mysql_url: str) -> Iterator[str]:
    """A fresh migrated database: a SQLite file in a temp dir, or ays_t_bench_<hex>."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="ays-bench-") as tmp:
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            upgrade(url)
            yield url
        return
    server = make_url(mysql_url)
    server = server.set(database=None, query={**server.query, "charset": "utf8mb4"})
    admin = create_engine(server)
    name = f"ays_t_bench_{secrets.token_hex(4)}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        url = make_url(mysql_url).set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        yield url
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql("SET SESSION lock_wait_timeout = 30")
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


def reset_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            for table in (JobLog, TimerRow, Task):
                conn.execute(delete(table))
        else:
            # TRUNCATE refuses a table other tables' foreign keys name (ays_task: the
            # dependency edges), even when they are empty, as they are here.
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
            for table in (JobLog, TimerRow, Task):
                conn.exec_driver_sql(f"TRUNCATE TABLE {table.__tablename__}")
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def insert_tasks(engine: Engine, count: int, schedule_of: Callable[[int], str]) -> None:
    """Bulk-insert `count` enabled shell tasks in one node group (executemany, 5k a batch)."""
    now = utcnow()
    with engine.begin() as conn:
        if conn.execute(select(NodeGroup.id).where(NodeGroup.name == GROUP)).first() is None:
            conn.execute(
                insert(NodeGroup).values(name=GROUP, description="", created_at=now, updated_at=now)
            )
    for start in range(0, count, 5000):
        rows = [
            {
                "name": f"bench-{i}",
                "description": "",
                "node_group": GROUP,
                "schedule": schedule_of(i),
                "timezone": "UTC",
                "task_type": "shell",
                "payload": {"command": "true"},
                "params": "",
                "enabled": True,
                "version": 1,
                "created_at": now,
                "updated_at": now,
            }
            for i in range(start, min(count, start + 5000))
        ]
        with engine.begin() as conn:
            conn.execute(insert(Task), rows)


def varied_schedule(i: int) -> str:
    return f"{i % 60} {(i // 60) % 60} * * * *"


def every_second(_i: int) -> str:
    return EVERY_SECOND


# --- 1. reconcile -----------------------------------------------------------------------------


def reconcile_once(rec: Reconciler, timers: TimerList) -> dict[str, float]:
    t0 = time.perf_counter()
    plan = rec.plan(memory_snapshot(timers), utcnow())
    t1 = time.perf_counter()
    rec.apply(plan)
    t2 = time.perf_counter()
    Reconciler.apply_to_memory(plan, timers)
    t3 = time.perf_counter()
    return {
        "total_ms": (t3 - t0) * 1000,
        "plan_ms": (t1 - t0) * 1000,
        "apply_ms": (t2 - t1) * 1000,
        "memory_ms": (t3 - t2) * 1000,
        "actions": len(plan.actions),
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, Any]:
    keys = ("total_ms", "plan_ms", "apply_ms", "memory_ms")
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["actions"] = [r["actions"] for r in runs]
    out["runs_total_ms"] = [round(r["total_ms"], 1) for r in runs]
    return out


def bench_reconcile(url: str, size: int, profile: bool) -> dict[str, Any]:
    engine = make_engine(url)
    try:
        reset_tables(engine)
        t0 = time.perf_counter()
        insert_tasks(engine, size, varied_schedule)
        progress(f"{size:,} tasks inserted in {time.perf_counter() - t0:.1f} s; reconciling")
        rec = Reconciler(engine, MANAGER, misfire_grace=5.0)
        timers = TimerList()
        install = reconcile_once(rec, timers)
        no_change = median_of([reconcile_once(rec, timers) for _ in range(5)])
        changed_runs = []
        for rep in range(3):
            with engine.begin() as conn:
                conn.execute(
                    update(Task).where(Task.id % 100 == rep).values(version=Task.version + 1)
                )
            changed_runs.append(reconcile_once(rec, timers))
        changed = median_of(changed_runs)
        result = {
            "tasks": size,
            "timers_in_memory": len(timers),
            "install": install,
            "no_change": no_change,
            "one_percent_changed": changed,
        }
        if profile:
            result["profile_no_change"] = profiled(lambda: reconcile_once(rec, timers))
        return result
    finally:
        engine.dispose()


def profiled(call: Callable[[], object], top: int = 14) -> str:
    prof = cProfile.Profile()
    prof.enable()
    call()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


# --- 3. RSS (child process) -------------------------------------------------------------------


def child_rss(url: str, traced: bool = False) -> dict[str, Any]:
    """In a fresh process: RSS before and after reconciling every task into a TimerList.

    With `traced`, tracemalloc also counts the Python heap still live after the reconcile
    (what the timers hold) and its peak (the plan's transient rows), which RSS cannot split.
    """
    if traced:
        tracemalloc.start()
    engine = make_engine(url)
    manager = f"bench-rss-{os.getpid()}"
    rec = Reconciler(engine, manager, misfire_grace=5.0)
    timers = TimerList()
    with engine.connect() as conn:  # warm the pool and the dialect before the baseline
        conn.execute(select(func.count()).select_from(Task)).scalar_one()
    gc.collect()
    before = rss()
    if traced:
        tracemalloc.reset_peak()
        heap_base = tracemalloc.get_traced_memory()[0]
    plan = rec.plan(memory_snapshot(timers), utcnow())
    rec.apply(plan)
    Reconciler.apply_to_memory(plan, timers)
    del plan
    gc.collect()
    after = rss()
    out: dict[str, Any] = {"timers": len(timers), "rss_before": before, "rss_after": after}
    if traced:
        live, peak = tracemalloc.get_traced_memory()
        out["heap_live"], out["heap_peak"] = live - heap_base, peak - heap_base
    with engine.begin() as conn:
        conn.execute(delete(TimerRow).where(TimerRow.manager_id == manager))
    engine.dispose()
    return out


CHILD_URL_VAR = "AYS_BENCH_CHILD_URL"


def run_child(mode: str, *args: str, url: str = "") -> dict[str, Any]:
    """Run this script as `--child mode args` and return its JSON line. The database URL
    travels in the environment, not on the command line, where `ps` would show its password."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, *args]
    env = os.environ | {CHILD_URL_VAR: url}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- 2. fire lateness -------------------------------------------------------------------------


async def run_step(url: str, n: int, seconds: float) -> dict[str, Any]:
    engine = make_engine(url)
    claimed: list[tuple[datetime, list[datetime]]] = []

    async def on_claimed(jobs: list[JobDispatch]) -> None:
        now = utcnow()
        claimed.append((now, [j.scheduled_at for j in jobs if j.trigger == "cron"]))

    sched = Scheduler(
        engine,
        MANAGER,
        on_claimed,
        reconcile_interval=5.0,
        misfire_grace=5.0,
        claim_ahead=CLAIM_AHEAD,
        claim_rate=BURST_RATE,
    )
    if os.environ.get("AYS_BENCH_IN_FLIGHT"):
        sched.writer.max_in_flight = int(os.environ["AYS_BENCH_IN_FLIGHT"])
    # Instrument (on this instance only) how long each fire burst and each claim batch take.
    bursts: list[tuple[float, int]] = []  # (ms, timers fired)
    batches: list[tuple[float, int]] = []  # (ms, fires in the batch)
    real_fire_due, real_claim = sched.fire_due, sched.writer._claim

    def timed_fire_due(
        now: datetime, limit: int | None = None, until: datetime | None = None
    ) -> int:
        t0 = time.perf_counter()
        count = real_fire_due(now, limit, until)
        if count:
            bursts.append(((time.perf_counter() - t0) * 1000, count))
        return count

    async def timed_claim(batch: list[Fire], owed: list[Any]) -> None:
        t0 = time.perf_counter()
        await real_claim(batch, owed)
        batches.append(((time.perf_counter() - t0) * 1000, len(batch)))

    sched.fire_due = timed_fire_due  # type: ignore[method-assign]
    sched.writer._claim = timed_claim  # type: ignore[method-assign]
    lags: list[float] = []
    backlog_max = 0
    runner = asyncio.create_task(sched.run(), name="scheduler")
    t_start = time.perf_counter()
    while len(sched.timers) < n:
        if runner.done():
            runner.result()
            raise RuntimeError("the scheduler stopped before installing its timers")
        await asyncio.sleep(0.02)
    install_s = time.perf_counter() - t_start
    t_ready = time.perf_counter()
    ready = utcnow()
    # The steady state: from when the start-up's own backlog (the slots due before the first
    # could be claimed ahead, all claimed at once) is surely behind.
    window_start = ready.replace(microsecond=0) + timedelta(seconds=4)
    window_end = window_start + timedelta(seconds=seconds)

    me, dbproc = psutil.Process(), (None if url.startswith("sqlite") else db_server_process())
    cpu0: tuple[float, float, float] | None = None

    # Sample event-loop lag (a 10 ms sleep's overshoot) and the writer backlog.
    give_up = window_end + timedelta(seconds=6)
    while True:
        now = utcnow()
        if cpu0 is None and now >= window_start:
            cpu0 = (time.perf_counter(), cpu_seconds(me), cpu_seconds(dbproc))
        if now >= window_end:
            deadline = sched.timers.next_deadline()
            if (deadline is not None and deadline >= window_end) or now >= give_up:
                break
        t0 = time.perf_counter()
        await asyncio.sleep(0.01)
        if window_start <= now < window_end:
            lags.append((time.perf_counter() - t0 - 0.01) * 1000)
            backlog_max = max(backlog_max, sched.writer.backlog)
    assert cpu0 is not None
    wall = time.perf_counter() - cpu0[0]
    self_cpu = (cpu_seconds(me) - cpu0[1]) / wall * 100
    db_cpu = (cpu_seconds(dbproc) - cpu0[2]) / wall * 100
    since_ready = time.perf_counter() - t_ready
    # Count the bursts and batches of the steady state only: not the install, not the flush.
    steady_bursts, steady_batches = bursts[1:], batches[1:]
    sched.stop()
    await runner

    with engine.connect() as conn:
        rows = conn.execute(
            select(JobLog.scheduled_at, JobLog.created_at).where(
                JobLog.trigger == TriggerKind.CRON.value,
                JobLog.scheduled_at >= window_start,
                JobLog.scheduled_at < window_end,
            )
        ).all()
    engine.dispose()
    claim_ms = [(c - s).total_seconds() * 1000 for s, c in rows]
    committed_ms = [
        (at - s).total_seconds() * 1000
        for at, slots in claimed
        for s in slots
        if window_start <= s < window_end
    ]
    achieved = len(rows) / seconds
    burst_ms = [ms for ms, _ in steady_bursts]
    batch_ms = [ms for ms, _ in steady_batches]
    batch_sizes = [size for _, size in steady_batches]
    claim = lateness_stats(claim_ms)
    committed = lateness_stats(committed_ms)
    return {
        "tasks": n,
        "seconds": seconds,
        "install_s": install_s,
        "expected_fires": int(n * seconds),
        "rows": len(rows),
        "fires_per_s": achieved,
        "claim": claim,
        "committed": committed,
        "loop_lag_p99_ms": percentile(lags, 99),
        "loop_lag_max_ms": max(lags) if lags else math.nan,
        "writer_backlog_max": backlog_max,
        "fire_due_burst_ms": {
            "p50": percentile(burst_ms, 50),
            "max": max(burst_ms) if burst_ms else math.nan,
            "bursts": len(burst_ms),
            "timers_per_burst_p50": percentile([float(c) for _, c in steady_bursts], 50),
        },
        "claim_batch_ms": {
            "p50": percentile(batch_ms, 50),
            "max": max(batch_ms) if batch_ms else math.nan,
            "batches": len(batch_ms),
            "size_p50": percentile([float(x) for x in batch_sizes], 50),
            # wall time inside claims (thread + waiting for the loop) / time since install
            "busy_share": sum(batch_ms) / 1000 / since_ready,
        },
        "self_cpu_pct": self_cpu,
        "db_cpu_pct": db_cpu,
        # The bar is on the committed figure: a claimed row not yet durable is not a fire.
        "sustained": achieved >= SUSTAINED_SHARE * n and committed["p99_ms"] < LATENESS_BAR_MS,
    }


def bench_lateness(url: str, steps: list[int], seconds: float) -> list[dict[str, Any]]:
    results = []
    for n in steps:
        engine = make_engine(url)
        reset_tables(engine)
        insert_tasks(engine, n, every_second)
        engine.dispose()
        mem = run_child("rss", url=url)
        progress(f"lateness step N={n:,} for {seconds:g} s ({load()})")
        gc.collect()
        step = asyncio.run(run_step(url, n, seconds))
        step["rss"] = mem
        step["load"] = os.getloadavg()
        results.append(step)
    return results


# --- 2b. burst ---------------------------------------------------------------------------------


async def run_burst(url: str, n: int) -> dict[str, Any]:
    """N tasks due in the same second of every minute: how long until all N slots of one
    such second are committed."""
    engine = make_engine(url)
    reset_tables(engine)
    # The second S: far enough ahead to insert, install and read the tasks (else the next
    # minute's S is measured).
    lead = 10 + n / 5_000
    second = int((utcnow() + timedelta(seconds=lead)).second)
    insert_tasks(engine, n, lambda _i: f"{second} * * * * *")
    committed: dict[datetime, list[datetime]] = {}

    async def on_claimed(jobs: list[JobDispatch]) -> None:
        now = utcnow()
        for job in jobs:
            if job.trigger == TriggerKind.CRON.value:
                committed.setdefault(job.scheduled_at, []).append(now)

    sched = Scheduler(
        engine,
        MANAGER,
        on_claimed,
        reconcile_interval=30.0,
        misfire_grace=5.0,
        claim_ahead=CLAIM_AHEAD,
        claim_rate=BURST_RATE,
    )
    runner = asyncio.create_task(sched.run(), name="scheduler")
    while len(sched.timers) < n:
        if runner.done():
            runner.result()
            raise RuntimeError("the scheduler stopped before installing its timers")
        await asyncio.sleep(0.05)
    while sched.writer.warming:
        await asyncio.sleep(0.05)
    # The burst as it comes every minute: timers installed and tasks read well before it.
    # When the start-up took too long for this minute's, the next minute's is measured.
    slot = sched.timers.next_deadline()
    assert slot is not None
    if slot - utcnow() < BURST_AHEAD + timedelta(seconds=1):
        slot += timedelta(minutes=1)
    progress(f"burst of {n:,}: timers installed, slot {slot:%H:%M:%S} ({load()})")
    give_up = slot + timedelta(seconds=60)
    while len(committed.get(slot, ())) < n and utcnow() < give_up:
        await asyncio.sleep(0.05)
    sched.stop()
    await runner
    with engine.connect() as conn:
        rows = conn.execute(
            select(JobLog.scheduled_at, JobLog.created_at).where(JobLog.scheduled_at == slot)
        ).all()
    engine.dispose()
    times = committed.get(slot, [])
    committed_ms = [(at - slot).total_seconds() * 1000 for at in times]
    claim_ms = [(c - s).total_seconds() * 1000 for s, c in rows]
    return {
        "tasks": n,
        "slot": slot.isoformat(),
        "committed_all": len(times),
        "rows": len(rows),
        "all_committed_s": max(committed_ms) / 1000 if committed_ms else math.nan,
        "committed": lateness_stats(committed_ms),
        "claim": lateness_stats(claim_ms),
        "load": os.getloadavg(),
    }


def server_floor(url: str, n: int) -> float:
    """Seconds the database alone takes to insert n job-log rows in one transaction (one
    INSERT ... SELECT over a generated series: no driver, no Python per row); the rows are
    then deleted. What a burst of n cannot go below on this server."""
    digits = " UNION ALL ".join(f"SELECT {d} AS d" for d in range(10))
    places = math.ceil(math.log10(max(n, 10)))
    series = " CROSS JOIN ".join(f"({digits}) AS p{i}" for i in range(places))
    number = " + ".join(f"p{i}.d * {10**i}" for i in range(places))
    engine = make_engine(url)
    try:
        quote = engine.dialect.identifier_preparer.quote
        slot = "'2000-01-01 00:00:00.000000'"
        sql = (
            f"INSERT INTO {JobLog.__tablename__} (task_id, scheduled_at, {quote('trigger')}, "
            "attempt, shard_index, shard_total, params, claim, manager_id, node, status, "
            f"created_at, output, message) SELECT {number} + 1, {slot}, 'cron', 0, 0, 1, '', "
            f"'floor', 'floor', '', 'pending', {slot}, '', '' FROM {series} "
            f"WHERE {number} < {n}"
        )
        with engine.begin() as conn:
            t0 = time.perf_counter()
            conn.exec_driver_sql(sql)
        took = time.perf_counter() - t0
        with engine.begin() as conn:
            conn.execute(delete(JobLog).where(JobLog.claim == "floor"))
        return took
    finally:
        engine.dispose()


def bench_bursts(url: str, sizes: list[int]) -> list[dict[str, Any]]:
    results = []
    for n in sizes:
        progress(f"burst of {n:,} slots in one second ({load()})")
        gc.collect()
        result = asyncio.run(run_burst(url, n))
        result["server_floor_s"] = server_floor(url, n)
        results.append(result)
    return results


# --- profile of the hot paths -----------------------------------------------------------------


def profile_hot_paths(url: str, n: int) -> dict[str, str]:
    """cProfile of fire_due() over n due timers, and of claim_in() for one 2,000 batch."""
    engine = make_engine(url)
    reset_tables(engine)
    insert_tasks(engine, n, every_second)

    async def on_claimed(_jobs: list[JobDispatch]) -> None:
        return None

    async def fire() -> tuple[str, list[Fire]]:
        sched = Scheduler(engine, MANAGER, on_claimed)
        schedule = parse_schedule(EVERY_SECOND)
        slot = utcnow().replace(microsecond=0)
        for task_id in range(1, n + 1):
            sched.timers.put(Timer(task_id, 1, schedule, "UTC", "skip", slot))
        text = profiled(lambda: sched.fire_due(slot + timedelta(milliseconds=5)))
        return text, list(sched.writer._queue)

    fire_text, fires = asyncio.run(fire())
    # As the claim writer does: the tasks' fields are cached (read when the timers were
    # installed); each batch reads only their versions and enabled flags.
    tasks = TaskCache()
    tasks.warm(engine, list(range(1, n + 1)))

    def claim(batch: list[Fire]) -> object:
        return transaction(engine, lambda c: claim_in(c, MANAGER, batch, utcnow(), tasks), "b")

    claim_text = profiled(lambda: claim(fires[:2000]))
    t0 = time.perf_counter()
    claim(fires[2000:4000])
    claim_ms = (time.perf_counter() - t0) * 1000
    engine.dispose()
    return {
        "fire_due": fire_text,
        "claim_in_2000": claim_text,
        "claim_in_2000_ms": f"{claim_ms:.1f}",
    }


# --- 4. APScheduler (child process) -----------------------------------------------------------


async def child_apscheduler(n: int, seconds: float) -> dict[str, Any]:
    from apscheduler.events import (
        EVENT_JOB_EXECUTED,
        EVENT_JOB_MAX_INSTANCES,
        EVENT_JOB_MISSED,
        EVENT_JOB_SUBMITTED,
    )
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.cron import CronTrigger

    submitted: list[tuple[datetime, list[datetime]]] = []
    executed: list[tuple[datetime, datetime]] = []
    missed: list[datetime] = []
    skipped = 0

    def listener(event: Any) -> None:
        nonlocal skipped
        now = datetime.now(UTC)
        if event.code == EVENT_JOB_SUBMITTED:
            submitted.append((now, event.scheduled_run_times))
        elif event.code == EVENT_JOB_EXECUTED:
            executed.append((now, event.scheduled_run_time))
        elif event.code == EVENT_JOB_MISSED:
            missed.append(event.scheduled_run_time)
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            skipped += 1

    async def noop() -> None:
        return None

    gc.collect()
    before = rss()
    sched = AsyncIOScheduler(
        jobstores={"default": MemoryJobStore()},
        timezone=UTC,
        job_defaults={"misfire_grace_time": 5, "coalesce": False, "max_instances": 1},
    )
    sched.add_listener(
        listener,
        EVENT_JOB_SUBMITTED | EVENT_JOB_EXECUTED | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES,
    )
    for i in range(n):
        sched.add_job(noop, CronTrigger(second="*", timezone=UTC), id=f"job{i}")
    sched.start()
    await asyncio.sleep(0.1)
    gc.collect()
    after = rss()
    ready = datetime.now(UTC)
    # The same window as the Ays steps' (run_step), so that the two are measured alike.
    window_start = ready.replace(microsecond=0) + timedelta(seconds=4)
    window_end = window_start + timedelta(seconds=seconds)
    me = psutil.Process()
    lags: list[float] = []
    cpu0: tuple[float, float] | None = None
    while True:
        now = datetime.now(UTC)
        if cpu0 is None and now >= window_start:
            cpu0 = (time.perf_counter(), cpu_seconds(me))
        if now >= window_end + timedelta(seconds=1.5):
            break
        t0 = time.perf_counter()
        await asyncio.sleep(0.01)
        if window_start <= now < window_end:
            lags.append((time.perf_counter() - t0 - 0.01) * 1000)
    assert cpu0 is not None
    cpu_pct = (cpu_seconds(me) - cpu0[1]) / (time.perf_counter() - cpu0[0]) * 100
    sched.shutdown(wait=False)
    await asyncio.sleep(0.1)

    def inside(slot: datetime) -> bool:
        return window_start <= slot < window_end

    sub_ms = [
        (at - s).total_seconds() * 1000 for at, slots in submitted for s in slots if inside(s)
    ]
    exe_ms = [(at - s).total_seconds() * 1000 for at, s in executed if inside(s)]
    return {
        "jobs": n,
        "seconds": seconds,
        "rss_before": before,
        "rss_after": after,
        "submitted": lateness_stats(sub_ms),
        "executed": lateness_stats(exe_ms),
        "fires_per_s": len(exe_ms) / seconds,
        "missed": sum(1 for s in missed if inside(s)),
        "max_instances_skips": skipped,
        "loop_lag_p99_ms": percentile(lags, 99),
        "loop_lag_max_ms": max(lags) if lags else math.nan,
        "self_cpu_pct": cpu_pct,
    }


# --- report -----------------------------------------------------------------------------------


def print_backend(name: str, data: dict[str, Any]) -> None:
    print()
    print(f"=== {name}: {data['url']} ===")
    print(f"load at start: {data['load_start']}")
    if data.get("reconcile"):
        print()
        print("Reconcile (plan + apply + apply_to_memory), milliseconds")
        print(
            f"{'tasks':>8} | {'install (all adds)':>19} | {'no change, med of 5':>20}"
            f" | {'1% changed, med of 3':>21} | no-change split plan/apply/mem"
        )
        for r in data["reconcile"]:
            nc, ch = r["no_change"], r["one_percent_changed"]
            print(
                f"{r['tasks']:>8,} | {fmt(r['install']['total_ms']):>19} | "
                f"{fmt(nc['total_ms']):>20} | {fmt(ch['total_ms']):>21} | "
                f"{fmt(nc['plan_ms'])}/{fmt(nc['apply_ms'])}/{fmt(nc['memory_ms'])}"
            )
        for r in data["reconcile"]:
            ch = r["one_percent_changed"]
            print(
                f"  {r['tasks']:,}: install split plan/apply/mem "
                f"{fmt(r['install']['plan_ms'])}/{fmt(r['install']['apply_ms'])}/"
                f"{fmt(r['install']['memory_ms'])} ms; 1% changed runs {ch['runs_total_ms']} "
                f"(actions {ch['actions']}); no-change runs {r['no_change']['runs_total_ms']}"
            )
    if data.get("rss_reconcile"):
        m = data["rss_reconcile"]
        delta = m["rss_after"] - m["rss_before"]
        print()
        print(
            f"Manager RSS with {m['timers']:,} timers installed: {m['rss_after'] / MB:,.1f} MB "
            f"(before {m['rss_before'] / MB:,.1f} MB, delta {delta / MB:,.1f} MB, "
            f"{delta / max(1, m['timers']):,.0f} B/timer)"
        )
        if "traced" in m:
            t = m["traced"]
            print(
                f"  tracemalloc (separate run): Python heap still live after the reconcile "
                f"{t['heap_live'] / MB:,.1f} MB ({t['heap_live'] / max(1, t['timers']):,.0f} "
                f"B/timer), peak during it {t['heap_peak'] / MB:,.1f} MB"
            )
    if data.get("lateness"):
        print()
        print(
            f"Fire lateness, N tasks all '{EVERY_SECOND}', {data['lateness'][0]['seconds']:g} s "
            "per step (ms; claim = created_at - slot, negative when claimed ahead; committed = "
            f"on_claimed - slot; claimed up to {CLAIM_AHEAD:g} s ahead)"
        )
        print(
            f"{'N':>6} | {'fires/s':>8} | {'COMMITTED p50':>13} {'p99':>7} {'max':>7} | "
            f"{'claim p50':>9} {'p99':>7} {'max':>7} | {'loop lag p99/max':>16} | "
            f"{'backlog':>7} | {'cpu% self/db':>12} | {'RSS MB':>6} | committed p99<100"
        )
        for s in data["lateness"]:
            c, k = s["claim"], s["committed"]
            print(
                f"{s['tasks']:>6,} | {fmt(s['fires_per_s'], 0):>8} | {fmt(k['p50_ms']):>13} "
                f"{fmt(k['p99_ms']):>7} {fmt(k['max_ms']):>7} | {fmt(c['p50_ms']):>9} "
                f"{fmt(c['p99_ms']):>7} {fmt(c['max_ms']):>7} | "
                f"{fmt(s['loop_lag_p99_ms']) + '/' + fmt(s['loop_lag_max_ms']):>16} | "
                f"{s['writer_backlog_max']:>7,} | "
                f"{fmt(s['self_cpu_pct'], 0) + '/' + fmt(s['db_cpu_pct'], 0):>12} | "
                f"{s['rss']['rss_after'] / MB:>6.0f} | "
                f"{'yes' if s['sustained'] else 'no'}"
            )
        for s in data["lateness"]:
            print(
                f"  N={s['tasks']:,}: {s['rows']:,}/{s['expected_fires']:,} slots claimed, "
                f"initial install {s['install_s']:.2f} s, load "
                f"{', '.join(f'{x:.2f}' for x in s['load'])}"
            )
            b, c = s["fire_due_burst_ms"], s["claim_batch_ms"]
            print(
                f"    fire_due per call p50/max {fmt(b['p50'])}/{fmt(b['max'])} ms "
                f"({fmt(b['timers_per_burst_p50'], 0)} timers); claim batch p50/max "
                f"{fmt(c['p50'])}/{fmt(c['max'])} ms, size p50 {fmt(c['size_p50'], 0)}, "
                f"{c['batches']} batches, writer busy {c['busy_share']:.0%} "
                "(batches overlap: over 100% is more than one in flight)"
            )
        best = data.get("sustained")
        print(
            "Highest sustained fires/s with committed p99 < 100 ms: "
            + (f"{best['fires_per_s']:,.0f} (N={best['tasks']:,})" if best else "none of the steps")
        )
    if data.get("bursts"):
        print()
        print(
            "Burst: N tasks all 'S * * * * *' (N slots due in the same second); "
            "seconds from the slot until all N committed; ms per slot; floor = seconds the "
            "database alone takes to insert N job-log rows (INSERT ... SELECT, no driver); "
            f"claimed up to {CLAIM_AHEAD:g} s ahead{burst_ahead_note()}"
        )
        print(
            f"{'N':>7} | {'committed':>9} | {'all in s':>8} | {'COMMITTED p50':>13} {'p99':>7} | "
            f"{'claim p50':>9} {'p99':>7} | {'floor s':>7} | load"
        )
        for b in data["bursts"]:
            k, c = b["committed"], b["claim"]
            print(
                f"{b['tasks']:>7,} | {b['committed_all']:>9,} | "
                f"{fmt(b['all_committed_s'], 2):>8} | "
                f"{fmt(k['p50_ms']):>13} {fmt(k['p99_ms']):>7} | {fmt(c['p50_ms']):>9} "
                f"{fmt(c['p99_ms']):>7} | {fmt(b['server_floor_s'], 2):>7} | "
                f"{', '.join(f'{x:.2f}' for x in b['load'])}"
            )
    if data.get("profile"):
        print()
        print(f"--- cProfile ({name}) ---")
        for key, text in data["profile"].items():
            print(f"[{key}]")
            print(text)


def summarise(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print()
    print("=== Summary ===")
    aps = report.get("apscheduler")
    for name, data in report["backends"].items():
        big = [r for r in data.get("reconcile", []) if r["tasks"] == 100_000]
        if big:
            ms = big[0]["no_change"]["total_ms"]
            verdict = "meets" if ms < 1000 else "misses"
            print(f"{name}: 100k tasks, no-change reconcile {ms:,.0f} ms ({verdict} the < 1 s bar)")
        best = data.get("sustained")
        steps = data.get("lateness", [])
        for s in steps:
            if s["tasks"] not in (2000, 10000):
                continue
            verdict = "meets" if s["sustained"] else "misses"
            print(
                f"{name}: {s['tasks']:,} fires/s step: {s['fires_per_s']:,.0f}/s, committed p99 "
                f"{fmt(s['committed']['p99_ms'])} ms (claim p99 {fmt(s['claim']['p99_ms'])} ms): "
                f"{verdict} the {s['tasks']:,}/s committed p99 < 100 ms bar "
                f"(load {', '.join(f'{x:.2f}' for x in s['load'])})"
            )
        for b in data.get("bursts", []):
            bar = ""
            if b["tasks"] == 100_000 and name == "mysql":
                ok = b["committed_all"] == b["tasks"] and b["all_committed_s"] < BURST_BAR_S
                bar = f": {'meets' if ok else 'misses'} the 100,000 in < {BURST_BAR_S:g} s bar"
            print(
                f"{name}: burst of {b['tasks']:,} slots in one second: "
                f"{b['committed_all']:,} committed, the last {fmt(b['all_committed_s'], 2)} s "
                f"after the slot{bar}; the database alone inserts {b['tasks']:,} rows in "
                f"{fmt(b['server_floor_s'], 2)} s (load {', '.join(f'{x:.2f}' for x in b['load'])})"
            )
        if steps:
            print(
                f"{name}: highest sustained step: "
                + (f"N={best['tasks']:,} ({best['fires_per_s']:,.0f} fires/s)" if best else "none")
                + f" of steps {', '.join(f'{s:,}' for s in args.steps)}"
            )
        if aps:
            same = [s for s in steps if s["tasks"] == aps["jobs"]]
            if steps and not same:
                print(f"{name}: no step with N={aps['jobs']:,} to compare with APScheduler")
            if same:
                s = same[0]
                a_exec = aps["executed"]["p99_ms"]
                ays_mem = s["rss"]["rss_after"] - s["rss"]["rss_before"]
                aps_mem = aps["rss_after"] - aps["rss_before"]
                print(
                    f"{name} vs APScheduler at {aps['jobs']:,} jobs: p99 lateness ratio "
                    f"Ays claim/APS executed {ratio(s['claim']['p99_ms'], a_exec)}, "
                    f"Ays committed/APS executed {ratio(s['committed']['p99_ms'], a_exec)}; "
                    f"memory ratio (RSS delta) {ratio(ays_mem, aps_mem)} "
                    f"({ays_mem / MB:.1f} MB vs {aps_mem / MB:.1f} MB); fires/s "
                    f"{s['fires_per_s']:,.0f} vs {aps['fires_per_s']:,.0f} "
                    f"(APS missed {aps['missed']:,})"
                )
    if aps:
        print()
        print(
            f"APScheduler {aps['version']} (AsyncIOScheduler, MemoryJobStore, "
            f"{aps['jobs']:,} x CronTrigger(second='*'), {aps['seconds']:g} s): "
            f"{aps['fires_per_s']:,.0f} runs/s; executed p50/p99/max "
            f"{fmt(aps['executed']['p50_ms'])}/{fmt(aps['executed']['p99_ms'])}/"
            f"{fmt(aps['executed']['max_ms'])} ms; submitted p50/p99/max "
            f"{fmt(aps['submitted']['p50_ms'])}/{fmt(aps['submitted']['p99_ms'])}/"
            f"{fmt(aps['submitted']['max_ms'])} ms; missed {aps['missed']}; loop lag p99/max "
            f"{fmt(aps['loop_lag_p99_ms'])}/{fmt(aps['loop_lag_max_ms'])} ms; cpu "
            f"{fmt(aps['self_cpu_pct'], 0)}%; RSS {aps['rss_after'] / MB:.1f} MB "
            f"(delta {(aps['rss_after'] - aps['rss_before']) / MB:.1f} MB)"
        )
    print()
    print("Notes:")
    print(
        "- APScheduler writes nothing to a database: each Ays fire is a committed job-log row "
        "(INSERT-or-ignore on the slot key, a claim SELECT). The lateness ratio is therefore "
        "not like for like; APS 'executed' = the no-op coroutine finished, APS 'submitted' "
        "events are only dispatched after the whole due batch is processed."
    )
    print(
        "- Ays claim lateness = job_log.created_at - scheduled_at; created_at is taken when the "
        "writer starts the batch, before its INSERT commits. Committed lateness adds the claim "
        "transaction."
    )
    print(
        f"- Sustained = rows in the window >= {SUSTAINED_SHARE:.0%} of N x seconds and "
        f"COMMITTED p99 < {LATENESS_BAR_MS:g} ms; the claim figure never decides a bar. "
        f"Shared machine: {report['load_end']} at the end."
    )


def ratio(ays: float, other: float) -> str:
    if math.isnan(ays) or math.isnan(other) or other == 0:
        return "n/a (a side fired nothing in the window)"
    return f"{ays / other:.2f}"


def best_sustained(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [s for s in steps if s["sustained"]]
    return max(ok, key=lambda s: s["tasks"]) if ok else None


# --- main -------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of integers") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: positive integers, e.g. 1000,2000")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=("sqlite", "mysql", "both"), default="both")
    p.add_argument("--steps", type=int_list, default=[1000, 2000, 5000, 10000])
    p.add_argument("--step-seconds", type=float, default=30.0)
    p.add_argument("--reconcile-sizes", type=int_list, default=[10000, 100000])
    p.add_argument("--skip-apscheduler", action="store_true")
    p.add_argument("--skip-reconcile", action="store_true")
    p.add_argument("--skip-lateness", action="store_true")
    p.add_argument(
        "--bursts",
        type=int_list,
        default=[10000, 50000, 100000],
        help="burst sizes: N slots due in the same second (default 10000,50000,100000)",
    )
    p.add_argument("--skip-bursts", action="store_true")
    p.add_argument("--apscheduler-jobs", type=int, default=10000)
    p.add_argument(
        "--mysql-url",
        default=os.environ.get("AYS_BENCH_MYSQL_URL", DEFAULT_MYSQL_URL),
        help="server to create ays_t_bench_<hex> on (env AYS_BENCH_MYSQL_URL)",
    )
    p.add_argument(
        "--claim-ahead",
        type=float,
        default=CLAIM_AHEAD,
        help=f"seconds before its slot a fire is claimed (default {CLAIM_AHEAD:g}, the "
        "manager's claim_ahead); 0 claims at the slot",
    )
    p.add_argument(
        "--no-burst-ahead",
        action="store_true",
        help="claim a crowded second (a burst) only --claim-ahead before it, not up to "
        f"{BURST_AHEAD.total_seconds():g} s as the manager does",
    )
    p.add_argument("--profile", action="store_true", help="print cProfile of the hot paths")
    p.add_argument("--json", type=Path, help="write the raw figures to this file")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 <= args.claim_ahead <= 5:
        p.error(f"--claim-ahead {args.claim_ahead}: must be between 0 and 5 seconds")
    if args.step_seconds <= 0:
        p.error(f"--step-seconds {args.step_seconds}: must be > 0")
    if args.skip_bursts:
        args.bursts = []
    return args


def main(argv: list[str] | None = None) -> int:
    global CLAIM_AHEAD, BURST_RATE
    args = parse_args(argv)
    CLAIM_AHEAD = args.claim_ahead
    if args.no_burst_ahead:
        BURST_RATE = NO_BURST_RATE
    if args.child:
        mode, *rest = args.child
        if mode == "rss":
            out = child_rss(os.environ[CHILD_URL_VAR], traced=rest == ["traced"])
        elif mode == "apscheduler":
            out = asyncio.run(child_apscheduler(int(rest[0]), float(rest[1])))
        else:
            raise SystemExit(f"unknown child mode {mode}")
        print(json.dumps(out))
        return 0

    backends = ["sqlite", "mysql"] if args.backend == "both" else [args.backend]
    report: dict[str, Any] = {
        "host": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_start": load(),
        "backends": {},
    }
    report["args"].pop("mysql_url", None)
    print(
        f"Ays scheduler benchmark; Python {platform.python_version()}; {load()}; "
        f"claim ahead {CLAIM_AHEAD:g} s{burst_ahead_note()}"
    )

    for backend in backends:
        print(f"[{backend}]", file=sys.stderr, flush=True)
        with database(backend, args.mysql_url) as url:
            data: dict[str, Any] = {"url": redacted(url), "load_start": load()}
            if not args.skip_reconcile:
                data["reconcile"] = []
                for size in args.reconcile_sizes:
                    progress(f"reconcile {size:,} tasks ({load()})")
                    data["reconcile"].append(bench_reconcile(url, size, args.profile))
                # The tasks of the largest size are still in the table: measure their RSS.
                data["rss_reconcile"] = run_child("rss", url=url)
                data["rss_reconcile"]["traced"] = run_child("rss", "traced", url=url)
            if not args.skip_lateness:
                data["lateness"] = bench_lateness(url, args.steps, args.step_seconds)
                data["sustained"] = best_sustained(data["lateness"])
            if args.bursts:
                data["bursts"] = bench_bursts(url, args.bursts)
            if args.profile:
                progress("profiling fire_due and claim_in")
                data["profile"] = profile_hot_paths(url, max(4000, *args.steps))
                for r in data.get("reconcile", []):
                    if "profile_no_change" in r:
                        data["profile"][f"reconcile_no_change_{r['tasks']}"] = r.pop(
                            "profile_no_change"
                        )
            data["load_end"] = load()
        report["backends"][backend] = data
        print_backend(backend, data)
        sys.stdout.flush()

    if not args.skip_apscheduler:
        import apscheduler

        progress(f"APScheduler {args.apscheduler_jobs:,} jobs for {args.step_seconds:g} s")
        aps = run_child("apscheduler", str(args.apscheduler_jobs), str(args.step_seconds))
        aps["version"] = apscheduler.__version__
        aps["load"] = os.getloadavg()
        report["apscheduler"] = aps

    report["load_end"] = load()
    summarise(args, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"raw figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
