#!/usr/bin/env python
"""Metrics benchmark: what GET /metrics costs; prints figures (never asserted).

1. Scrape time: `generate_latest` of the manager's registry (what GET /metrics answers),
   with its scrape-time gauges attached to a database holding --tasks tasks, --nodes nodes in
   5 groups and --runs job logs (1% of them unfinished): median and p95 of --scrapes scrapes,
   and the size of the answer.
2. Instrumentation per fire: the calls the firing path makes for one run (claimed: counter
   and lateness; dispatched and stored: lateness), timed over batches of 2,000 dispatches, in
   microseconds per fire; and `runs_finished` (its one read of the stored runs, by id) per
   batch of 500 runs.

    .venv/bin/python bench/metrics_bench.py                       # SQLite in a temp dir
    .venv/bin/python bench/metrics_bench.py --url mysql+pymysql://... (an empty database)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from prometheus_client import generate_latest
from sqlalchemy import Engine, insert, select

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scheduler_bench import insert_tasks, varied_schedule  # noqa: E402

from ays_runtime.metrics import manager as metrics  # noqa: E402
from ays_runtime.scheduler.firing import make_dispatch  # noqa: E402
from ays_runtime.storage.database import make_engine, utcnow  # noqa: E402
from ays_runtime.storage.migrate import upgrade  # noqa: E402
from ays_runtime.storage.models import JobLog, Node, NodeGroup, Task  # noqa: E402


def seed(engine: Engine, tasks: int, nodes: int, runs: int) -> list[int]:
    insert_tasks(engine, tasks, varied_schedule)
    now = utcnow()
    with engine.begin() as conn:
        groups = [f"g{i}" for i in range(5)]
        conn.execute(
            insert(NodeGroup),
            [{"name": g, "description": "", "created_at": now, "updated_at": now} for g in groups],
        )
        conn.execute(
            insert(Node),
            [
                {
                    "ip": "10.0.0.1",
                    "port": 20000 + i,
                    "node_group": groups[i % 5],
                    "status": "online" if i % 7 else "offline",
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(nodes)
            ],
        )
        task_ids = list(conn.execute(select(Task.id)).scalars())
    for start in range(0, runs, 5000):
        rows = []
        for i in range(start, min(runs, start + 5000)):
            slot = now - timedelta(seconds=runs - i)
            status = ("pending", "dispatched", "running")[i % 3] if i % 100 == 0 else "succeeded"
            rows.append(
                {
                    "task_id": task_ids[i % len(task_ids)],
                    "scheduled_at": slot,
                    "status": status,
                    "created_at": slot,
                    "started_at": slot,
                    "ended_at": slot + timedelta(seconds=1),
                    "node": "10.0.0.1:20001",
                }
            )
        with engine.begin() as conn:
            conn.execute(insert(JobLog), rows)
    with engine.connect() as conn:
        return list(conn.execute(select(JobLog.id).order_by(JobLog.id.desc()).limit(500)).scalars())


def timed(fn: object, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - began)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="an empty database (default: SQLite in a temp dir)")
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--nodes", type=int, default=50)
    p.add_argument("--runs", type=int, default=200_000)
    p.add_argument("--scrapes", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{tmp}/bench.db"
        upgrade(url)
        engine = make_engine(url)
        began = time.perf_counter()
        stored = seed(engine, args.tasks, args.nodes, args.runs)
        print(
            f"seeded {args.tasks} tasks, {args.nodes} nodes, {args.runs} job logs "
            f"({engine.dialect.name}) in {time.perf_counter() - began:.1f}s"
        )
        metrics.attach(
            metrics.ManagerState(engine, lambda: args.tasks, lambda: 0), transport="builtin"
        )

        size = len(generate_latest(metrics.REGISTRY))
        scrapes = sorted(timed(lambda: generate_latest(metrics.REGISTRY), args.scrapes))
        p95 = scrapes[max(0, round(0.95 * len(scrapes)) - 1)]
        print(
            f"scrape: best {scrapes[0] * 1000:.1f} ms, "
            f"median {statistics.median(scrapes) * 1000:.1f} ms, "
            f"p95 {p95 * 1000:.1f} ms, {size} bytes"
        )

        task = {
            "id": 1,
            "name": "t",
            "node_group": "g0",
            "params": "",
            "task_type": "shell",
            "payload": {},
            "timeout_s": 0,
            "route_strategy": "first",
            "block_strategy": "serial",
            "retry_count": 0,
            "retry_backoff": "fixed",
            "retry_interval_s": 0,
        }
        now = utcnow()
        batch = [make_dispatch(task, i, now, "cron", 0, "") for i in range(2000)]

        def per_fire() -> None:
            metrics.fires_claimed(batch, now)
            for job in batch:
                metrics.run_dispatched(job, "dispatched")
                metrics.run_dispatched(job, "stored")

        fires = timed(per_fire, 50)
        print(
            f"instrumentation per fire: median {statistics.median(fires) / 2000 * 1e6:.2f} us, "
            f"best {min(fires) / 2000 * 1e6:.2f} us (50 batches of 2,000)"
        )
        finished = timed(lambda: metrics.count_finished(engine, stored), 20)
        print(
            f"runs_finished per batch of {len(stored)} runs: "
            f"{statistics.median(finished) * 1000:.1f} ms (median of 20)"
        )
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
