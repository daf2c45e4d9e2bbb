#!/usr/bin/env python
"""Console data benchmark: how long the console's queries take with 10k tasks and 1M job-log
rows, on SQLite and MariaDB; prints p50/p99 per entry (figures, never asserted).

Data (bulk inserted, a few seconds on SQLite):

* --tasks tasks (10,000) in 4 node groups with 20 nodes, schedules drawn from a fixed mix
  (a fifth every minute at :00, the rest hourly, daily, every 30 s and `@every 5m`, in four
  time zones), a tenth disabled, each tagged with one of 20 teams (`team-N`), a third
  `nightly` too;
* --rows job-log rows (1,000,000) over the last --days days (7: about 100 fires a minute),
  one per slot (task, scheduled time), lateness 5-50 ms with a tail, statuses 90% succeeded,
  5% failed, 1% timed out, 2% skipped, 0.5% node lost, the rest killed; the newest 200 are
  pending, dispatched or running. One task ("slot-task", every minute) has a row for nearly
  every slot of the last day, for the slot view.

Entries (each timed over --loads loads, 50 by default, each load in a session of its own
as a request has; the first load is not left out, and is also shown on its own: the
overview reads the whole day on its first load and keeps the settled minutes):

    overview                 overview.overview()
    task list page           tasks.list_tasks(limit=50, offset=5000)
    task search              tasks.list_tasks(name="task-12", limit=50)
    task filter              tasks.list_tasks(node_group=..., enabled=True, limit=50)
    task filter by two tags  tasks.list_tasks(tags=["nightly", "team-7"], limit=50)
    run list                 tasks.list_job_logs(limit=50)
    run list by status       ... status="failed"
    run list by task         ... task_id=...
    run list by node + time  ... node=..., since/until the last hour
    slot view (1 day)        slots.slot_ledger(slot-task, the last 24 h: 1,440 slots)
    forecast (24 h)          forecast.forecast(hours=24) over every enabled task
    GET /api/v1/overview     the same through the manager's API (FastAPI TestClient)

The list is built by `entries()`: timing a console page is one more `Entry(name, load)` whose
`load` fetches the page with the same TestClient (see `api_entries`).

    .venv/bin/python bench/console_bench.py                       # both backends
    .venv/bin/python bench/console_bench.py --backend sqlite --rows 200000 --loads 20
MariaDB: --mysql-url (default $AYS_BENCH_MYSQL_URL, else the local ays_test user); a fresh
database ays_t_bench_<hex> is created and dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from scheduler_bench import database  # a fresh migrated database on either backend
from sqlalchemy import Engine, insert, text
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.config import EnvConfig
from ays_runtime.manager import forecast, overview, slots, tasks
from ays_runtime.manager.api import create_app
from ays_runtime.manager.context import ManagerContext
from ays_runtime.manager.output import RunOutput
from ays_runtime.storage.database import make_engine, redacted, session_factory, utcnow
from ays_runtime.storage.models import Manager, Node, NodeGroup, Task

DEFAULT_MYSQL_URL = "mysql+pymysql://ays_test:ays_test@127.0.0.1:3306/ays_test"
TOKEN = "bench-token"
GROUPS = ("group_ksa", "group_uae", "group_eu", "group_us")
ZONES = ("UTC", "Asia/Riyadh", "Europe/Berlin", "America/New_York")
SLOT_TASK = "slot-task"
CHUNK = 20_000


@dataclass
class Entry:
    """One thing timed: `load()` does what one page view does."""

    name: str
    load: Callable[[], object]
    loads: int | None = None  # None: --loads


@dataclass
class Data:
    sessions: sessionmaker[Session]
    now: datetime
    slot_task_id: int
    busy_task_id: int
    node: str


# --- the data ---------------------------------------------------------------------------------


def schedule_mix(rng: random.Random, i: int) -> tuple[str, str]:
    """A schedule and time zone for task i: the mix the module docstring describes."""
    zone = ZONES[i % len(ZONES)]
    kind = i % 10
    if kind < 2:
        return "0 * * * * *", zone  # every minute at :00: the pile-up
    if kind < 6:
        return f"0 {rng.randrange(60)} * * * *", zone  # hourly
    if kind < 8:
        return f"0 {rng.randrange(60)} {rng.randrange(24)} * * *", zone  # daily
    if kind == 8:
        return "*/30 * * * * *", zone
    return "@every 5m", "UTC"


def seed(engine: Engine, n_tasks: int, n_rows: int, days: int, now: datetime) -> Data:
    rng = random.Random(14)
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(
            insert(NodeGroup),
            [{"name": g, "description": "", "created_at": now, "updated_at": now} for g in GROUPS],
        )
        conn.execute(
            insert(Node),
            [
                {
                    "ip": f"10.0.{g}.{n}",
                    "port": 18181,
                    "node_group": group,
                    "status": "online" if n % 7 else "offline",
                    "source": "self",
                    "version": "1",
                    "running_jobs": 0,
                    "last_seen": now,
                    "created_at": now,
                    "updated_at": now,
                }
                for g, group in enumerate(GROUPS)
                for n in range(5)
            ],
        )
        conn.execute(
            insert(Manager),
            [{"manager_id": "10.0.9.1:18080", "version": "1", "started_at": now, "last_seen": now}],
        )
        rows = []
        for i in range(n_tasks):
            schedule, zone = schedule_mix(rng, i)
            name = f"task-{i}"
            if i == 1:
                name, schedule, zone = SLOT_TASK, "0 * * * * *", "UTC"
            rows.append(
                {
                    "name": name,
                    "description": "",
                    "node_group": GROUPS[i % len(GROUPS)],
                    "schedule": schedule,
                    "timezone": zone,
                    "task_type": "shell",
                    "payload": {"command": f"echo {i}"},
                    "params": "",
                    "enabled": i % 10 != 7,
                    # 20 teams, a third nightly: `?tag=team-7&tag=nightly` matches ~1 in 60
                    "tags": sorted([f"team-{i % 20}", *(["nightly"] if i % 3 == 0 else [])]),
                    "created_at": now - timedelta(days=days + 1),
                    "updated_at": now - timedelta(days=days + 1),
                }
            )
        for start in range(0, len(rows), CHUNK):
            conn.execute(insert(Task), rows[start : start + CHUNK])
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(text("SELECT id, name FROM ays_task ORDER BY id"))]
        slot_task_id = conn.execute(
            text("SELECT id FROM ays_task WHERE name = :n"), {"n": SLOT_TASK}
        ).scalar_one()
    print(f"  {n_tasks} tasks in {time.perf_counter() - started:.1f} s", flush=True)

    started = time.perf_counter()
    nodes = [f"10.0.{g}.{n}:18181" for g in range(len(GROUPS)) for n in range(5)]
    span = timedelta(days=days).total_seconds()
    slot_rows = 1440  # the slot task's last day, every minute, a few missing
    others = n_rows - slot_rows
    busy_task_id = ids[2]
    batch: list[dict[str, Any]] = []

    columns = list(job_row(rng, 0, now, nodes, late_tail=False))
    mark = "?" if engine.dialect.name == "sqlite" else "%s"
    quote = engine.dialect.identifier_preparer.quote  # `trigger` is a reserved word in MySQL
    statement = (
        f"INSERT INTO ays_job_log ({', '.join(map(quote, columns))}) "
        f"VALUES ({', '.join([mark] * len(columns))})"
    )

    def flush() -> None:
        # The driver's executemany (multi-row INSERTs with PyMySQL), date-times as the text
        # SQLAlchemy stores: 5-10 times faster than an ORM-level insert of dicts.
        values = [tuple(_stored(row[c]) for c in columns) for row in batch]
        with engine.begin() as conn:
            conn.exec_driver_sql(statement, values)
        batch.clear()

    first_minute = now.replace(second=0, microsecond=0) - timedelta(minutes=slot_rows)
    for m in range(slot_rows):
        if m % 97 == 5:
            continue  # not fired
        at = first_minute + timedelta(minutes=m)
        batch.append(job_row(rng, slot_task_id, at, nodes, late_tail=m % 50 == 0))
    for k in range(others):
        # Evenly spread and distinct slot times, oldest first; every 50th row on one task.
        at = now - timedelta(seconds=span * (1 - k / others)) + timedelta(microseconds=k % 997)
        task_id = busy_task_id if k % 50 == 0 else ids[rng.randrange(len(ids))]
        row = job_row(rng, task_id, at, nodes, late_tail=rng.random() < 0.01)
        if k >= others - 200:
            row["status"] = ("pending", "dispatched", "running")[k % 3]
            row["ended_at"] = None
        batch.append(row)
        if len(batch) >= CHUNK:
            flush()
    if batch:
        flush()
    took = time.perf_counter() - started
    print(f"  {n_rows} job-log rows in {took:.1f} s ({n_rows / took:,.0f} rows/s)", flush=True)
    return Data(session_factory(engine), now, slot_task_id, busy_task_id, nodes[3])


def _stored(value: object) -> object:
    return f"{value:%Y-%m-%d %H:%M:%S.%f}" if isinstance(value, datetime) else value


def job_row(
    rng: random.Random, task_id: int, at: datetime, nodes: list[str], late_tail: bool
) -> dict[str, Any]:
    late = timedelta(milliseconds=rng.uniform(5, 50) + (rng.uniform(500, 8000) if late_tail else 0))
    roll = rng.random()
    status = (
        "succeeded"
        if roll < 0.90
        else "failed"
        if roll < 0.95
        else "timed_out"
        if roll < 0.96
        else "skipped"
        if roll < 0.98
        else "node_lost"
        if roll < 0.985
        else "killed"
    )
    return {
        "task_id": task_id,
        "scheduled_at": at,
        "trigger": "cron",
        "attempt": 0,
        "shard_index": 0,
        "shard_total": 1,
        "params": "",
        "claim": "",
        "manager_id": "10.0.9.1:18080",
        "node": nodes[task_id % len(nodes)],
        "status": status,
        "created_at": at + late,
        "started_at": at + late * 2,
        "ended_at": at + late * 2 + timedelta(seconds=rng.uniform(0.1, 30)),
        "exit_code": 0 if status == "succeeded" else 1,
        "output": "",
        "message": "" if status == "succeeded" else f"{status}: exit 1",
    }


# --- what is timed ----------------------------------------------------------------------------


def in_session(
    sessions: sessionmaker[Session], work: Callable[[Session], object]
) -> Callable[[], object]:
    def load() -> object:
        with sessions() as session:
            return work(session)

    return load


def entries(data: Data, client: TestClient) -> list[Entry]:
    s = data.sessions
    now = data.now
    return [
        Entry("overview", in_session(s, lambda x: overview.overview(x, now=now))),
        Entry(
            "task list page", in_session(s, lambda x: tasks.list_tasks(x, limit=50, offset=5000))
        ),
        Entry(
            "task search", in_session(s, lambda x: tasks.list_tasks(x, name="task-12", limit=50))
        ),
        Entry(
            "task filter",
            in_session(
                s, lambda x: tasks.list_tasks(x, node_group=GROUPS[1], enabled=True, limit=50)
            ),
        ),
        Entry(
            "task filter by two tags",
            in_session(s, lambda x: tasks.list_tasks(x, tags=["nightly", "team-7"], limit=50)),
        ),
        Entry("run list", in_session(s, lambda x: tasks.list_job_logs(x, limit=50))),
        Entry(
            "run list by status",
            in_session(s, lambda x: tasks.list_job_logs(x, status="failed", limit=50)),
        ),
        Entry(
            "run list by task",
            in_session(s, lambda x: tasks.list_job_logs(x, task_id=data.busy_task_id, limit=50)),
        ),
        Entry(
            "run list by node + time",
            in_session(
                s,
                lambda x: tasks.list_job_logs(
                    x, node=data.node, since=now - timedelta(hours=1), until=now, limit=50
                ),
            ),
        ),
        Entry(
            "slot view (1 day)",
            in_session(
                s,
                lambda x: slots.slot_ledger(
                    x, data.slot_task_id, now - timedelta(days=1), now, now=now
                ),
            ),
        ),
        Entry("forecast (24 h)", in_session(s, lambda x: forecast.forecast(x, hours=24))),
        *api_entries(client, data),
    ]


def api_entries(client: TestClient, data: Data) -> list[Entry]:
    """Timings through HTTP; a console page is one more of these (`client.get("/")`)."""

    def get(path: str) -> Callable[[], object]:
        def load() -> object:
            response = client.get(path)
            if response.status_code != 200:
                raise SystemExit(f"{path}: {response.status_code} {response.text[:200]}")
            return response

        return load

    return [
        Entry("GET /api/v1/overview", get("/api/v1/overview")),
        Entry("GET /api/v1/tasks?limit=50", get("/api/v1/tasks?limit=50&offset=5000")),
        Entry("GET /api/v1/job-logs?limit=50", get("/api/v1/job-logs?limit=50")),
        Entry("GET /api/v1/tasks/{id}/slots", get(f"/api/v1/tasks/{data.slot_task_id}/slots")),
    ]


def app_client(sessions: sessionmaker[Session]) -> TestClient:
    config = EnvConfig.model_validate(
        {
            "env": "dev",
            "storage": {"url": "sqlite:///unused.db"},
            "registry": {"backend": "builtin"},
            "transport": {"backend": "builtin"},
        }
    )

    async def nothing(*_args: object) -> Any:
        raise RuntimeError("not in this benchmark")

    ctx = ManagerContext(
        config=config,
        sessions=sessions,
        access_token=TOKEN,
        manager_id="127.0.0.1:18080",
        on_tasks_changed=nothing,
        trigger_now=nothing,
        kill_run=nothing,
        run_output=RunOutput(sessions, TOKEN),
        version="bench",
    )
    return TestClient(create_app(ctx), headers={"Authorization": f"Bearer {TOKEN}"})


def time_entry(entry: Entry, loads: int) -> dict[str, float]:
    times = []
    for _ in range(entry.loads or loads):
        started = time.perf_counter()
        entry.load()
        times.append((time.perf_counter() - started) * 1000)
    first = times[0]
    times.sort()
    return {
        "first_ms": first,
        "p50_ms": statistics.median(times),
        "p99_ms": times[min(len(times) - 1, round(0.99 * (len(times) - 1)))],
        "max_ms": times[-1],
        "loads": len(times),
    }


# --- running it -------------------------------------------------------------------------------


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    load = os.getloadavg()
    print(f"\n== {backend}: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    with database(backend, args.mysql_url) as url:
        if backend != "sqlite":
            print(f"  {redacted(url)}")
        engine = make_engine(url)
        try:
            data = seed(engine, args.tasks, args.rows, args.days, utcnow())
            if backend == "sqlite":
                with engine.begin() as conn:
                    conn.exec_driver_sql("ANALYZE")
            client = app_client(data.sessions)
            results: dict[str, Any] = {}
            print(f"  {'entry':<34} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'1st ms':>9}  loads")
            for entry in entries(data, client):
                if args.only and args.only not in entry.name:
                    continue
                figures = time_entry(entry, args.loads)
                results[entry.name] = figures
                print(
                    f"  {entry.name:<34} {figures['p50_ms']:9.1f} {figures['p99_ms']:9.1f} "
                    f"{figures['max_ms']:9.1f} {figures['first_ms']:9.1f}  {figures['loads']}",
                    flush=True,
                )
            load = os.getloadavg()
            print(f"  load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
            return {"load_before": list(load), "entries": results}
        finally:
            engine.dispose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=("sqlite", "mysql", "both"), default="both")
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=7, help="the job log's span")
    p.add_argument("--loads", type=int, default=50, help="loads per entry")
    p.add_argument("--only", help="only the entries whose name holds this")
    p.add_argument(
        "--mysql-url",
        default=os.environ.get("AYS_BENCH_MYSQL_URL", DEFAULT_MYSQL_URL),
        help="server to create ays_t_bench_<hex> on (env AYS_BENCH_MYSQL_URL)",
    )
    p.add_argument("--json", type=Path, help="write the raw figures to this file")
    args = p.parse_args(argv)
    if args.tasks < 10 or args.rows < 2000:
        p.error("--tasks: at least 10; --rows: at least 2000")
    print(
        f"console bench: {args.tasks} tasks, {args.rows} job-log rows over {args.days} days, "
        f"{args.loads} loads per entry; {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )
    backends = ("sqlite", "mysql") if args.backend == "both" else (args.backend,)
    report = {backend: run_backend(backend, args) for backend in backends}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
