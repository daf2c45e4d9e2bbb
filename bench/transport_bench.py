#!/usr/bin/env python
"""Transport benchmark: jobs per second end to end, built-in HTTP dispatch vs RocketMQ (through
the proxy emulator), side by side in one run, with the same nodes; prints figures.

For each transport, in turn, on 127.0.0.1: a real manager (`aysManager debug`) on a fresh
SQLite database and --nodes real nodes (`aysNode debug`, same group, same settings, same
ports for both transports), the built-in registry; for RocketMQ the emulator runs in this
process. For each offered rate R in --rates, R shell tasks running `true` fire every second
(`* * * * * *`) for a --seconds window (after --settle seconds), then are disabled.
Figures for the jobs scheduled in the window:

    jobs/s        jobs / (last end of them - window start): R when the path keeps up
    sched>end     scheduled time -> the node's end of the run, p50 and p95 (ms)
    ok            succeeded / jobs

Both transports share everything else (scheduler, SQLite, process spawn per job), so the
difference is the dispatch and result path. The emulator is a Python process sharing this
machine's CPUs with the manager and the nodes: RocketMQ figures measure Ays's RocketMQ path
and the client library, not a real broker. Performance is reported, never asserted.

    .venv/bin/python bench/transport_bench.py                      # rates 50,100,200,400
    .venv/bin/python bench/transport_bench.py --rates 100 --seconds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml
from sqlalchemy import create_engine, func, insert, select, update

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ays_runtime.storage.models import JobLog, Task  # noqa: E402
from tests.daemons import (  # noqa: E402
    TOKEN,
    Daemon,
    free_port,
    manager,
    node,
    wait_for,
    write_config,
)

GROUP = "bench"
PREFIX = "ays_"
FINAL = {"succeeded", "failed", "timed_out", "killed", "node_lost", "skipped", "discarded"}


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


@contextmanager
def cluster(
    transport: str, workdir: Path, node_ports: list[int], max_concurrent: int
) -> Iterator[tuple[int, Path]]:
    """A manager and the nodes for `transport`; yields (manager port, database file)."""
    emulator = None
    if transport == "rocketmq":
        from tests.emulators.rocketmq import RocketMQEmulator

        topics = [f"{PREFIX}{GROUP}", f"{PREFIX}{GROUP}_bcast", f"{PREFIX}result"]
        emulator = RocketMQEmulator(topics=topics).start()
    db = workdir / "ays.db"
    manager_port = free_port()
    path = write_config(
        workdir / "ays.yaml",
        f"sqlite:///{db}",
        manager_port,
        workdir,
        manager={"log_dir": str(workdir / "log"), "reconcile_interval": 1},
        node={"max_concurrent_jobs": max_concurrent, "log_dir": str(workdir / "log")},
        registry={"heartbeat_interval": 2},
    )
    if emulator is not None:
        config = yaml.safe_load(path.read_text())
        config["transport"] = {
            "backend": "rocketmq",
            "endpoints": [emulator.endpoint],
            "topic_prefix": PREFIX,
            "result_topic": f"{PREFIX}result",
        }
        path.write_text(yaml.safe_dump(config))
    daemons: list[Daemon] = []
    try:
        daemons.append(manager(path, workdir / "manager.log", manager_port).start())
        with api(manager_port) as client:
            client.post("/node-groups", json={"name": GROUP}).raise_for_status()
        for i, port in enumerate(node_ports):
            daemons.append(node(path, workdir / f"node{i}.log", GROUP, port).start())

        def online() -> bool:
            with api(manager_port) as client:
                items = client.get("/nodes", params={"status": "online"}).json()["items"]
            return len(items) == len(node_ports)

        wait_for(online, 30, "the nodes online")
        yield manager_port, db
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        if emulator is not None:
            emulator.close()


def api(port: int) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}/api/v1",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )


def create_tasks(db: Path, count: int, tag: str) -> list[int]:
    """`count` enabled shell tasks running `true` every second, written straight into the
    database (no API call under load); the manager's next reconcile tick installs them."""
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = [
        {
            "name": f"bench-{tag}-{i}",
            "description": "",
            "node_group": GROUP,
            "schedule": "* * * * * *",
            "timezone": "UTC",
            "task_type": "shell",
            "payload": {"command": "true"},
            "params": "",
            # Spread over the nodes, as RocketMQ's consumer group does (the model's default,
            # `first`, would send every run to one node).
            "route_strategy": "round_robin",
            "enabled": True,
            "version": 1,
            "created_at": now,
            "updated_at": now,
        }
        for i in range(count)
    ]
    engine = create_engine(f"sqlite:///{db}", connect_args={"timeout": 30})
    try:
        with engine.begin() as conn:
            conn.execute(insert(Task), rows)
            names = [row["name"] for row in rows]
            return list(conn.execute(select(Task.id).where(Task.name.in_(names))).scalars())
    finally:
        engine.dispose()


def disable_tasks(db: Path, ids: list[int]) -> None:
    engine = create_engine(f"sqlite:///{db}", connect_args={"timeout": 30})
    try:
        with engine.begin() as conn:
            conn.execute(
                update(Task).where(Task.id.in_(ids)).values(enabled=False, version=Task.version + 1)
            )
    finally:
        engine.dispose()


def window_rows(db: Path, ids: list[int], start: datetime, end: datetime) -> list[Any]:
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    select(JobLog.status, JobLog.scheduled_at, JobLog.ended_at).where(
                        JobLog.task_id.in_(ids),
                        JobLog.scheduled_at >= start,
                        JobLog.scheduled_at < end,
                    )
                )
            )
    finally:
        engine.dispose()


def wait_final(db: Path, ids: list[int], timeout: float) -> None:
    engine = create_engine(f"sqlite:///{db}")
    try:
        deadline = time.monotonic() + timeout
        while True:
            with engine.connect() as conn:
                left = conn.execute(
                    select(func.count())
                    .select_from(JobLog)
                    .where(JobLog.task_id.in_(ids), JobLog.status.not_in(FINAL))
                ).scalar_one()
            if not left:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{left} runs still unfinished after {timeout:g}s")
            time.sleep(0.2)
    finally:
        engine.dispose()


def measure_rate(port: int, db: Path, rate: int, args: argparse.Namespace) -> dict[str, Any]:
    """`rate` tasks firing every second for --seconds; what came out the other end."""
    ids = create_tasks(db, rate, f"{rate}-{time.monotonic_ns()}")
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    start = now + timedelta(seconds=args.settle)
    end = start + timedelta(seconds=args.seconds)
    time.sleep(max(0.0, (end - datetime.now(UTC).replace(tzinfo=None)).total_seconds()))
    disable_tasks(db, ids)
    wait_final(db, ids, args.timeout)
    rows = window_rows(db, ids, start, end)
    lateness = [(r.ended_at - r.scheduled_at).total_seconds() for r in rows if r.ended_at]
    last = max(r.ended_at for r in rows if r.ended_at)
    return {
        "offered_per_s": rate,
        "jobs": len(rows),
        "jobs_per_s": len(rows) / (last - start).total_seconds(),
        "end_p50_ms": percentile(lateness, 50) * 1000,
        "end_p95_ms": percentile(lateness, 95) * 1000,
        "end_p99_ms": percentile(lateness, 99) * 1000,
        "succeeded": sum(1 for r in rows if r.status == "succeeded"),
    }


def measure(
    transport: str, args: argparse.Namespace, node_ports: list[int]
) -> list[dict[str, Any]]:
    results = []
    tmp = Path(tempfile.mkdtemp(prefix=f"ays-bench-{transport}-"))
    with cluster(transport, tmp, node_ports, args.max_concurrent) as (port, db):
        for rate in args.rates:
            print(f"{transport}: {rate} jobs/s for {args.seconds:g}s", file=sys.stderr)
            figures = measure_rate(port, db, rate, args)
            results.append({"transport": transport, **figures})
    if args.keep:
        print(f"{transport}: logs and database kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates", type=lambda v: [int(x) for x in v.split(",")], default=[50, 100, 200, 400]
    )
    parser.add_argument("--seconds", type=float, default=10, help="measured window per rate")
    parser.add_argument("--settle", type=float, default=4, help="seconds before the window")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--max-concurrent", type=int, default=32, help="per node")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep logs and databases")
    parser.add_argument(
        "--transports", type=lambda v: v.split(","), default=["builtin", "rocketmq"]
    )
    args = parser.parse_args()
    node_ports = [free_port() for _ in range(args.nodes)]
    results = {t: measure(t, args, node_ports) for t in args.transports}
    print(
        f"\n`true` every second per task (round_robin), {args.nodes} nodes x {args.max_concurrent} "
        "slots, "
        f"SQLite, built-in registry; window {args.seconds:g}s per rate\n"
    )
    names = list(results)
    head = "{:>9}" + " | {:>9} {:>9} {:>9} {:>9}" * len(names)
    print(head.format("offered", *[c for n in names for c in (n, "p50 ms", "p95 ms", "ok")]))
    print(head.format("jobs/s", *["jobs/s", "sched>end", "sched>end", ""] * len(names)))
    for i, rate in enumerate(args.rates):
        cells = []
        for name in names:
            r = results[name][i]
            cells += [
                f"{r['jobs_per_s']:.1f}",
                f"{r['end_p50_ms']:.0f}",
                f"{r['end_p95_ms']:.0f}",
                f"{r['succeeded']}/{r['jobs']}",
            ]
        print(head.format(rate, *cells))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
