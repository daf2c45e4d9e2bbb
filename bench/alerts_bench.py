#!/usr/bin/env python
"""Alerting and metrics benchmark: what they cost the firing path; prints figures (never
asserted).

In one run, on one database, the real Scheduler fires --tasks tasks due every second (--tasks
fires/s) in phases of --seconds each, alternating

    off   no alert service, metrics.firing off (nothing counted or timed on the firing path)
    on    the manager's AlertService running with --rules rules over one webhook channel
          (a local receiver): every claimed batch handed to `runs_stored` (the judge reads
          them), the periodic rules looked at every second, the policies read every 5 s, the
          queue polled; metrics.firing on

after a warm-up phase (not counted), as off, on, off, on (--rounds pairs, so a drift of the
machine shows). Per phase: claim lateness (job_log
created_at - scheduled_at) and committed lateness (on_claimed received it - scheduled_at),
p50/p99, fires/s achieved. The ratio is on / off of the p99s (both phases of each kind
pooled). Then the scrape time of GET /metrics's registry over a database of --scrape-tasks
tasks (and the last phase's job log).

    .venv/bin/python bench/alerts_bench.py                            # SQLite in a temp dir
    .venv/bin/python bench/alerts_bench.py --url mysql+pymysql://... (an empty database)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from sqlalchemy import Engine, delete, select

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scheduler_bench import every_second, insert_tasks, percentile, varied_schedule  # noqa: E402

from ays_runtime.alerts.service import AlertService  # noqa: E402
from ays_runtime.alerts.settings import AlertSettings  # noqa: E402
from ays_runtime.metrics import manager as metrics  # noqa: E402
from ays_runtime.scheduler.scheduler import Scheduler  # noqa: E402
from ays_runtime.storage.database import make_engine, utcnow  # noqa: E402
from ays_runtime.storage.migrate import upgrade  # noqa: E402
from ays_runtime.storage.models import JobLog, Task, TimerRow, TriggerKind  # noqa: E402
from ays_runtime.transport.base import JobDispatch  # noqa: E402

MANAGER = "127.0.0.1:18080"
KINDS = [
    ("run_failed", 40),
    ("consecutive_failures", 20),
    ("started_late", 10),
    ("running_longer_than", 10),
    ("slot_missed", 10),
    ("node_offline", 5),
    ("group_unhealthy", 5),
]


def alert_settings(rules: int, hook_port: int) -> AlertSettings:
    """`rules` rules of every kind (KINDS' shares), each over the one channel."""
    made: list[dict[str, Any]] = []
    total = sum(share for _, share in KINDS)
    for when, share in KINDS:
        for i in range(max(1, rules * share // total)):
            rule: dict[str, Any] = {"name": f"{when}-{i}", "when": when, "channels": ["hook"]}
            if when == "running_longer_than":
                rule |= {"seconds": 600} | ({"factor": 5} if i % 2 else {})
            made.append(rule)
    return AlertSettings.model_validate(
        {
            "channels": [
                {"name": "hook", "type": "webhook", "url": f"http://127.0.0.1:{hook_port}/"}
            ],
            "rules": made[:rules],
            "watch_interval": 1.0,
        }
    )


async def phase(engine: Engine, tasks: int, seconds: float, alerts: AlertSettings | None) -> dict:
    with engine.begin() as conn:  # a fresh start: no timer installed, no job log
        conn.execute(delete(JobLog))
        conn.execute(delete(TimerRow))
    if engine.dialect.name == "sqlite":  # not a checkpoint of the last phase's rows in this one
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    metrics.configure(task_labels=False, firing=alerts is not None)
    service = AlertService(engine, alerts, "bench", MANAGER) if alerts is not None else None
    committed: list[float] = []

    async def on_claimed(jobs: list[JobDispatch]) -> None:
        now = utcnow()
        committed.extend(
            (now - j.scheduled_at).total_seconds() * 1000 for j in jobs if j.trigger == "cron"
        )
        if service is not None:
            service.runs_stored([j.job_log_id for j in jobs])

    sched = Scheduler(engine, MANAGER, on_claimed, reconcile_interval=5.0, misfire_grace=5.0)
    alerting = asyncio.create_task(service.run()) if service is not None else None
    runner = asyncio.create_task(sched.run())
    while len(sched.timers) < tasks:
        if runner.done():
            runner.result()
        await asyncio.sleep(0.05)
    start = utcnow().replace(microsecond=0) + timedelta(seconds=2)
    end = start + timedelta(seconds=seconds)
    committed.clear()
    while utcnow() < end + timedelta(seconds=2):
        await asyncio.sleep(0.1)
    sched.stop()
    await runner
    if alerting is not None:
        alerting.cancel()
        await asyncio.gather(alerting, return_exceptions=True)
    with engine.connect() as conn:
        rows = conn.execute(
            select(JobLog.scheduled_at, JobLog.created_at).where(
                JobLog.trigger == TriggerKind.CRON.value,
                JobLog.scheduled_at >= start,
                JobLog.scheduled_at < end,
            )
        ).all()
    claim = [(c - s).total_seconds() * 1000 for s, c in rows]
    return {
        "claim": claim,
        "committed": committed,
        "fires_per_s": len(rows) / seconds,
        "load": os.getloadavg()[0],
    }


def stats(values: list[float]) -> str:
    if not values:
        return "no fires"
    return f"p50 {percentile(values, 50):.1f} ms, p99 {percentile(values, 99):.1f} ms"


class _Receiver:
    """A local HTTP server taking any POST (the channel; rules seldom fire here)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="an empty database (default: SQLite in a temp dir)")
    p.add_argument("--tasks", type=int, default=2000, help="tasks due every second")
    p.add_argument("--rules", type=int, default=100)
    p.add_argument("--seconds", type=float, default=20.0, help="each phase")
    p.add_argument("--rounds", type=int, default=2, help="off, on pairs")
    p.add_argument("--warmup", type=float, default=10.0, help="a first phase, not counted")
    p.add_argument("--scrapes", type=int, default=20)
    p.add_argument("--scrape-tasks", type=int, default=10_000, help="tasks when scraping")
    args = p.parse_args()
    receiver = _Receiver()
    settings = alert_settings(args.rules, receiver.port)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{tmp}/bench.db"
        upgrade(url)
        engine = make_engine(url)
        insert_tasks(engine, args.tasks, every_second)
        metrics.attach(
            metrics.ManagerState(engine, lambda: args.tasks, lambda: 0), transport="builtin"
        )
        print(
            f"{args.tasks} tasks every second ({engine.dialect.name}), {len(settings.rules)} "
            f"alert rules, phases of {args.seconds:g} s, {os.cpu_count()} CPUs, "
            f"load {os.getloadavg()[0]:.2f} at start",
            flush=True,
        )
        pooled: dict[str, dict[str, list[float]]] = {
            "off": {"claim": [], "committed": [], "last": []},
            "on": {"claim": [], "committed": [], "last": []},
        }
        asyncio.run(phase(engine, args.tasks, args.warmup, None))  # caches, pages, JIT-less
        for name in ("off", "on") * args.rounds:
            began = datetime.now()
            result = asyncio.run(
                phase(engine, args.tasks, args.seconds, settings if name == "on" else None)
            )
            pooled[name]["last"] = result["claim"]
            pooled[name]["claim"] += result["claim"]
            pooled[name]["committed"] += result["committed"]
            print(
                f"{name:>3} ({began:%H:%M:%S}, load {result['load']:.2f}): "
                f"{result['fires_per_s']:.0f} fires/s; claim {stats(result['claim'])}; "
                f"committed {stats(result['committed'])}",
                flush=True,
            )
            if name == "on":
                last_off = pooled["off"]["last"]
                pair = percentile(result["claim"], 99) / max(percentile(last_off, 99), 1e-9)
                print(f"    this pair's p99 claim lateness, on / off: {pair:.2f}", flush=True)
        for kind in ("claim", "committed"):
            on, off = pooled["on"][kind], pooled["off"][kind]
            if on and off:
                ratio = percentile(on, 99) / max(percentile(off, 99), 1e-9)
                print(f"p99 {kind} lateness, on / off: {ratio:.2f}")
        with engine.begin() as conn:  # the scrape at --scrape-tasks tasks
            conn.execute(delete(Task))
        insert_tasks(engine, args.scrape_tasks, varied_schedule)
        scrapes = []
        for _ in range(args.scrapes):
            began_s = time.perf_counter()
            size = len(generate_latest(metrics.REGISTRY))
            scrapes.append(time.perf_counter() - began_s)
        print(
            f"scrape at {args.scrape_tasks} tasks: "
            f"median {statistics.median(scrapes) * 1000:.1f} ms, "
            f"best {min(scrapes) * 1000:.1f} ms, {size} bytes"
        )
        engine.dispose()
    receiver.server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
