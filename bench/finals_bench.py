#!/usr/bin/env python
"""Final-writes benchmark: the time of the manager's writer thread for a batch of results
(`RunTracker._write_finals`, one group-committed transaction), on SQLite and MariaDB; prints
figures, asserts none.

Each round claims N runs of one task (no retry, no child), marks them running on a node (as
its start claims would), then writes N `succeeded` finals from that node in one batch: the
figure is that call's time (read, guards, UPDATEs, commit), median over the rounds after a
warm-up one, with the statements the call ran (this thread's only: the metrics thread's read
of the stored runs is left out).

Run:  .venv/bin/python bench/finals_bench.py                    (both backends, N = 50, 100)
      .venv/bin/python bench/finals_bench.py --backend sqlite --sizes 50,100,500 --rounds 21
MariaDB: --mysql-url (default $AYS_BENCH_MYSQL_URL, else the local ays_test user); a fresh
database ays_t_bench_<hex> is created and dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, event, update

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dependencies_bench import add_tasks  # noqa: E402
from scheduler_bench import DEFAULT_MYSQL_URL, database  # noqa: E402

from ays_runtime.manager.runs import RunTracker, _Final  # noqa: E402
from ays_runtime.scheduler.firing import Fire, claim_slots  # noqa: E402
from ays_runtime.storage.database import make_engine, utcnow  # noqa: E402
from ays_runtime.storage.models import JobLog, RunStatus  # noqa: E402

MANAGER = "127.0.0.1:18080"
NODE = "127.0.0.1:18181"


async def _redispatch(_jobs: object) -> None:
    return None


def running_runs(engine: Engine, task_id: int, first: int, count: int) -> list[int]:
    """`count` claimed runs of slots `first`.. seconds after the minute, running on NODE."""
    start = utcnow().replace(second=0, microsecond=0)
    fires = [Fire(task_id, start + timedelta(seconds=first + i)) for i in range(count)]
    ids = [job.job_log_id for job in claim_slots(engine, MANAGER, fires, utcnow())]
    with engine.begin() as conn:
        conn.execute(
            update(JobLog)
            .where(JobLog.id.in_(ids))
            .values(status=RunStatus.RUNNING.value, node=NODE, started_at=utcnow())
        )
    return ids


def measure(url: str, sizes: list[int], rounds: int) -> None:
    engine = make_engine(url)
    me = threading.get_ident()
    statements: list[str] = []

    def count(_conn: object, _cur: object, statement: str, *_: object) -> None:
        if threading.get_ident() == me:
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    (task_id,) = add_tasks(engine, ["finals"], [[]], "all")  # no parent, no child
    tracker = RunTracker(engine, MANAGER, excerpt_bytes=1024, redispatch=_redispatch)
    slot = 0
    for size in sizes:
        times: list[float] = []
        for _ in range(rounds + 1):  # the first round warms up (pool, caches)
            ids = running_runs(engine, task_id, slot, size)
            slot += size
            now = utcnow()
            finals = [_Final(i, "succeeded", "", NODE, 0, now, now, "ok\n") for i in ids]
            statements.clear()
            began = time.perf_counter()
            answers = tracker._write_finals(finals)
            times.append(time.perf_counter() - began)
            if not all(stored for stored, *_ in answers):
                raise SystemExit(f"finals_bench: a final of {size} was not stored")
        times = times[1:]
        median = statistics.median(times)
        print(
            f"  {size:4d} results: median {median * 1000:7.2f} ms"
            f" ({median / size * 1000:.3f} ms a result; min {min(times) * 1000:.2f},"
            f" max {max(times) * 1000:.2f}), {len(statements)} statements"
        )
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "mysql", "both"), default="both")
    parser.add_argument("--sizes", default="50,100", help="batch sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=15, help="measured rounds per size")
    parser.add_argument(
        "--mysql-url",
        default=os.environ.get("AYS_BENCH_MYSQL_URL", DEFAULT_MYSQL_URL),
        help="server to create ays_t_bench_<hex> on (env AYS_BENCH_MYSQL_URL)",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = ("sqlite", "mysql") if args.backend == "both" else (args.backend,)
    for backend in backends:
        print(backend)
        with database(backend, args.mysql_url) as url:
            measure(url, sizes, args.rounds)


if __name__ == "__main__":
    main()
