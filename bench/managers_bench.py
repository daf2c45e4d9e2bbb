#!/usr/bin/env python
"""Several managers on one MariaDB: what a second and a third manager add (issue 19 item 1).

For each count in --managers (default 1,2,3): a fresh database with --tasks tasks, all
`* * * * * *` (due every second), in a node group with no node (each run is failed at once
as "no node": the dispatch side's cheapest path, the same for every count); that many real
manager processes (`run_manager`, info logging, beat 2 s / silent 6 s) started; once every
task is held by its one owner (scheduler/ownership.py), a window of --seconds is measured:

    fires/s            scheduled slots claimed in the window (the managers' summed
                       ays_fires_claimed_total{cron,misfire}) / window
    committed p99      ays_fire_lateness_seconds{stage="claimed"} (observed when the claim
                       transaction has committed), merged over the managers, p99 read as
                       Prometheus' histogram_quantile does (linear in its bucket)
    claim p99          job_log.created_at - scheduled_at, exact, slots in the window
    inserts per slot   summed ays_fires_submitted_total (job-log inserts tried) / slots due
                       in the window (tasks x seconds): n with every manager firing every
                       slot, 1 with ownership. (Over slots claimed it would read high when
                       the managers cannot keep up: claims lag the fires.)
    CPU / 1,000 fires  managers' user+system CPU seconds over the window, per 1,000 fires;
                       the MariaDB server's beside it

Performance is reported, never asserted. Run:

    .venv/bin/python bench/managers_bench.py --tasks 10000 --seconds 20

MariaDB: --mysql-url (default $AYS_BENCH_MYSQL_URL, else the local ays_test user); a fresh
database ays_t_mbench_<hex> per count, dropped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml
from sqlalchemy import create_engine, insert, select
from sqlalchemy.engine import make_url

from ays_runtime.scheduler.ownership import owner_of
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.migrate import upgrade
from ays_runtime.storage.models import JobLog, NodeGroup, Task, TimerRow

DEFAULT_MYSQL_URL = "mysql+pymysql://ays_test:ays_test@127.0.0.1:3306/ays_test"
TOKEN = "bench-token-not-secret"
GROUP = "bench_nodes_none"


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def database(mysql_url: str) -> Iterator[str]:
    server = make_url(mysql_url)
    server = server.set(database=None, query={**server.query, "charset": "utf8mb4"})
    admin = create_engine(server)
    name = f"ays_t_mbench_{secrets.token_hex(4)}"
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


def insert_tasks(url: str, count: int) -> list[int]:
    engine = create_engine(url)
    now = utcnow()
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(NodeGroup).values(name=GROUP, description="", created_at=now, updated_at=now)
            )
        for start in range(0, count, 5000):
            rows = [
                {
                    "name": f"bench-{i}",
                    "description": "",
                    "node_group": GROUP,
                    "schedule": "* * * * * *",
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
        with engine.connect() as conn:
            return list(conn.execute(select(Task.id)).scalars())
    finally:
        engine.dispose()


def start_manager(url: str, tmp: Path, port: int) -> subprocess.Popen[bytes]:
    config = {
        "env": "dev",
        "access_token": TOKEN,
        "storage": {"url": url},
        "registry": {"backend": "builtin"},
        "transport": {"backend": "builtin"},
        "manager": {
            "ip": "127.0.0.1",
            "port": port,
            "data_dir": str(tmp / f"m{port}"),
            "beat_interval": 2,
            "silent_after": 6,
        },
    }
    path = tmp / f"m{port}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    code = (
        "import sys; from pathlib import Path; from ays_runtime.logs import configure_logging; "
        "from ays_installer.options import choose_config; "
        "from ays_runtime.manager.service import run_manager; "
        "configure_logging(debug=False); run_manager(choose_config(None, Path(sys.argv[1])))"
    )
    log = open(tmp / f"m{port}.log", "ab")  # noqa: SIM115 - the child holds it
    return subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=log, stderr=subprocess.STDOUT
    )


def metrics(port: int) -> str:
    return httpx.get(
        f"http://127.0.0.1:{port}/metrics",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    ).text


def counter(text: str, pattern: str) -> float:
    return sum(float(m) for m in re.findall(pattern, text, re.MULTILINE))


def committed_buckets(text: str) -> dict[float, float]:
    out: dict[float, float] = {}
    pattern = r'^ays_fire_lateness_seconds_bucket\{le="([^"]+)",stage="claimed"\} (\S+)$'
    for le, value in re.findall(pattern, text, re.MULTILINE):
        out[math.inf if le == "+Inf" else float(le)] = float(value)
    return out


def snapshot(ports: list[int]) -> dict[str, Any]:
    submitted = claimed = 0.0
    buckets: dict[float, float] = {}
    for port in ports:
        text = metrics(port)
        submitted += counter(text, r"^ays_fires_submitted_total (\S+)$")
        claimed += counter(text, r'^ays_fires_claimed_total\{trigger="(?:cron|misfire)"\} (\S+)$')
        for le, value in committed_buckets(text).items():
            buckets[le] = buckets.get(le, 0.0) + value
    return {"submitted": submitted, "claimed": claimed, "buckets": buckets}


def histogram_p99(before: dict[float, float], after: dict[float, float]) -> float:
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return math.nan
    rank, lower, below = 0.99 * total, 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


def cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def db_server() -> psutil.Process | None:
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in ("mariadbd", "mysqld"):
            return proc
    return None


def settled(url: str, tasks: list[int], live: list[str]) -> bool:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            held = conn.execute(select(TimerRow.task_id, TimerRow.manager_id)).all()
    finally:
        engine.dispose()
    holders: dict[int, list[str]] = {}
    for task_id, manager_id in held:
        if manager_id in live:
            holders.setdefault(task_id, []).append(manager_id)
    return all(holders.get(t) == [owner_of(t, live)] for t in tasks)


def claim_p99(url: str, start: Any, end: Any) -> float:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(JobLog.created_at, JobLog.scheduled_at).where(
                    JobLog.scheduled_at >= start, JobLog.scheduled_at < end, JobLog.attempt == 0
                )
            ).all()
    finally:
        engine.dispose()
    late = sorted((c - s).total_seconds() for c, s in rows)
    return late[min(len(late) - 1, int(0.99 * len(late)))] if late else math.nan


def run_count(args: argparse.Namespace, count: int) -> dict[str, Any]:
    with database(args.mysql_url) as url, tempfile.TemporaryDirectory(prefix="ays-mb-") as tmp:
        progress(f"{count} manager(s): inserting {args.tasks} tasks")
        tasks = insert_tasks(url, args.tasks)
        ports = [free_port() for _ in range(count)]
        children = [start_manager(url, Path(tmp), port) for port in ports]
        try:
            live = sorted(f"127.0.0.1:{p}" for p in ports)
            deadline = time.monotonic() + 180
            while not settled(url, tasks, live):
                if time.monotonic() > deadline or any(c.poll() is not None for c in children):
                    logs = "\n".join(p.read_text()[-2000:] for p in Path(tmp).glob("*.log"))
                    raise SystemExit(f"managers did not settle:\n{logs}")
                time.sleep(1)
            progress(f"{count} manager(s): settled; warming up {args.warmup:g} s")
            time.sleep(args.warmup)
            procs = [psutil.Process(c.pid) for c in children]
            server = db_server()
            time.sleep(1.5 - time.time() % 1.0)  # at x.5 s: no claim of x.0 in flight
            began = time.monotonic()
            before, cpu0 = snapshot(ports), cpu(procs)
            db0 = cpu([server]) if server else math.nan
            start_at = utcnow().replace(microsecond=0) + timedelta(seconds=1)
            time.sleep(max(0.0, began + args.seconds - time.monotonic()))
            ended = time.monotonic()
            after, cpu1 = snapshot(ports), cpu(procs)
            db1 = cpu([server]) if server else math.nan
            end_at = utcnow().replace(microsecond=0)
            window = round(ended - began)
            load = os.getloadavg()
        finally:
            for child in children:
                child.terminate()
            for child in children:
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()
        fires = after["claimed"] - before["claimed"]
        return {
            "managers": count,
            "tasks": args.tasks,
            "fires_per_s": fires / window,
            "committed_p99_ms": histogram_p99(before["buckets"], after["buckets"]) * 1000,
            "claim_p99_ms": claim_p99(url, start_at, end_at) * 1000,
            "inserts_per_slot": (after["submitted"] - before["submitted"]) / (args.tasks * window),
            "cpu_per_1000": (cpu1 - cpu0) / fires * 1000 if fires else math.nan,
            "db_cpu_per_1000": (db1 - db0) / fires * 1000 if fires else math.nan,
            "load": " ".join(f"{x:.2f}" for x in load),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="every-second tasks")
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="measured window (whole seconds)"
    )
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before the window")
    parser.add_argument("--managers", default="1,2,3", help="manager counts, comma-separated")
    parser.add_argument(
        "--mysql-url", default=os.environ.get("AYS_BENCH_MYSQL_URL", DEFAULT_MYSQL_URL)
    )
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.managers.split(",")]
    print(f"managers_bench: {args.tasks} tasks every second, {args.seconds:g} s window, MariaDB")
    print(f"load before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, cpus {os.cpu_count()}")
    results = [run_count(args, n) for n in counts]
    print(
        f"{'managers':>8} {'fires/s':>9} {'committed p99':>14} {'claim p99':>10} "
        f"{'inserts/slot':>13} {'CPU s/1k fires':>15} {'MariaDB CPU s/1k':>17}  load"
    )
    for r in results:
        print(
            f"{r['managers']:>8} {r['fires_per_s']:>9.0f} {r['committed_p99_ms']:>11.0f} ms "
            f"{r['claim_p99_ms']:>7.0f} ms {r['inserts_per_slot']:>13.3f} "
            f"{r['cpu_per_1000']:>15.3f} {r['db_cpu_per_1000']:>17.3f}  {r['load']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
