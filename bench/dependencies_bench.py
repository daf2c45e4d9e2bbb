#!/usr/bin/env python
"""Dependencies benchmark (issue 18): fan-out 1 -> N children and fan-in N -> 1, on MariaDB
(or SQLite); prints figures, asserts none.

What it measures, through the manager's own code (`RunTracker.record_result`, which stores a
run's end and, in the same transaction, claims the children's runs: ays_runtime.dependencies),
in this process, with a dispatch path that records when each child's run is handed to it:

1. Fan-out: one parent, N children `after` it. Its run's result is reported; the figure is
   the time from the report to the last child's run handed to dispatch (every child claimed
   and committed), and the number handed (N expected, once each).
2. Fan-in: N parents, one child `after` all of them (mode `all`), N runs of one slot. N - 1
   results are reported as a burst (the child waits); the figure is the time from the last
   parent's result to the child's run handed to dispatch. The burst's time is printed too.

"Dispatched" here is the manager handing the run to its transport (the same call a timer's
fire makes); the network hop to a node is the e2e benchmark's subject (bench/e2e_bench.py).

Run:  .venv/bin/python bench/dependencies_bench.py              (MariaDB, N = 1000)
      .venv/bin/python bench/dependencies_bench.py --backend sqlite --n 1000
MariaDB: --mysql-url (default $AYS_BENCH_MYSQL_URL, else the local ays_test user); a fresh
database ays_t_bench_<hex> is created and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, insert, select

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scheduler_bench import DEFAULT_MYSQL_URL, database, load  # noqa: E402

from ays_runtime.manager.runs import RunTracker  # noqa: E402
from ays_runtime.protocol import JobResultReport  # noqa: E402
from ays_runtime.scheduler.firing import Fire, claim_slots  # noqa: E402
from ays_runtime.storage.database import make_engine, utcnow  # noqa: E402
from ays_runtime.storage.models import NodeGroup, Task, TaskEdge  # noqa: E402
from ays_runtime.transport.base import JobDispatch  # noqa: E402

MANAGER = "127.0.0.1:18080"
GROUP = "bench_group"


def add_tasks(engine: Engine, names: list[str], after: list[list[str]], mode: str) -> list[int]:
    """Tasks `names`, task i after the tasks `after[i]` (condition success), edges included."""
    now = utcnow()
    base = {
        "description": "",
        "node_group": GROUP,
        "timezone": "UTC",
        "task_type": "shell",
        "payload": {"command": "true"},
        "params": "",
        "created_at": now,
        "updated_at": now,
    }
    with engine.begin() as conn:
        if conn.execute(select(NodeGroup.id).where(NodeGroup.name == GROUP)).first() is None:
            conn.execute(
                insert(NodeGroup).values(name=GROUP, description="", created_at=now, updated_at=now)
            )
        conn.execute(
            insert(Task),
            [
                base
                | {
                    "name": name,
                    "schedule": "" if parents else "0 0 0 1 1 *",
                    "after": [{"task": p, "condition": "success"} for p in parents],
                    "after_mode": mode,
                }
                for name, parents in zip(names, after, strict=True)
            ],
        )
        ids = dict(conn.execute(select(Task.name, Task.id).where(Task.name.in_(names))).all())
        edges = [
            {"child_id": ids[name], "parent_name": p, "condition": "success"}
            for name, parents in zip(names, after, strict=True)
            for p in parents
        ]
        for start in range(0, len(edges), 1000):
            conn.execute(insert(TaskEdge), edges[start : start + 1000])
    return [ids[name] for name in names]


def report(job: JobDispatch) -> JobResultReport:
    now = utcnow()
    return JobResultReport(
        job_log_id=job.job_log_id,
        node="127.0.0.1:1",
        status="succeeded",
        exit_code=0,
        started_at=now,
        ended_at=now,
        output="",
    )


class Recorder:
    """The dispatch path: notes when each run is handed to it."""

    def __init__(self) -> None:
        self.handed: list[tuple[float, JobDispatch]] = []
        self.changed = asyncio.Event()

    async def __call__(self, jobs: list[JobDispatch]) -> None:
        now = time.perf_counter()
        self.handed.extend((now, job) for job in jobs)
        self.changed.set()

    async def until(self, count: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.handed) < count:
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(self.handed)} of {count} runs handed to dispatch")
            await asyncio.wait_for(self.changed.wait(), left)


async def fan_out(engine: Engine, n: int, tag: str) -> dict[str, float]:
    parent = f"{tag}_parent"
    ids = add_tasks(engine, [parent], [[]], "all")
    add_tasks(engine, [f"{tag}_child_{i}" for i in range(n)], [[parent]] * n, "all")
    at = utcnow().replace(microsecond=0)
    (job,) = claim_slots(engine, MANAGER, [Fire(ids[0], at)], utcnow())
    recorder = Recorder()
    tracker = RunTracker(engine, MANAGER, 1024, recorder)
    began = time.perf_counter()
    await tracker.record_result(report(job))
    stored = time.perf_counter()
    await recorder.until(n)
    await tracker.stop()
    once = len({j.task_id for _, j in recorder.handed}) == len(recorder.handed)
    return {
        "children": float(len(recorder.handed)),
        "each_once": float(once),
        "result_stored_ms": (stored - began) * 1000,
        "all_dispatched_ms": (recorder.handed[-1][0] - began) * 1000,
    }


async def fan_in(engine: Engine, n: int, tag: str, one_by_one: bool = False) -> dict[str, float]:
    names = [f"{tag}_parent_{i}" for i in range(n)]
    ids = add_tasks(engine, names, [[]] * n, "all")
    (child,) = add_tasks(engine, [f"{tag}_child"], [names], "all")
    at = utcnow().replace(microsecond=0) + timedelta(seconds=1)
    jobs = claim_slots(engine, MANAGER, [Fire(i, at) for i in ids], utcnow())
    recorder = Recorder()
    tracker = RunTracker(engine, MANAGER, 1024, recorder)
    began = time.perf_counter()
    if one_by_one:  # each parent's end its own transaction (parents ending apart)
        for job in jobs[:-1]:
            await tracker.record_result(report(job))
    else:
        await asyncio.gather(*(tracker.record_result(report(job)) for job in jobs[:-1]))
    burst = time.perf_counter() - began
    assert not recorder.handed, "the child fired before its last parent ended"
    last = time.perf_counter()
    await tracker.record_result(report(jobs[-1]))
    await recorder.until(1)
    await tracker.stop()
    return {
        "parents": float(n),
        "child_runs": float(len(recorder.handed)),
        "burst_of_n_minus_1_ms": burst * 1000,
        "last_parent_to_child_ms": (recorder.handed[0][0] - last) * 1000,
        "child_is_it": float(recorder.handed[0][1].task_id == child),
    }


async def bench(url: str, n: int, repeat: int) -> None:
    engine = make_engine(url)
    try:
        outs, ins, apart = [], [], []
        for r in range(repeat):
            outs.append(await fan_out(engine, n, f"out{r}"))
            ins.append(await fan_in(engine, n, f"in{r}"))
            apart.append(await fan_in(engine, n, f"apart{r}", one_by_one=True))
            print(
                f"  round {r + 1}: fan-out {outs[-1]['all_dispatched_ms']:.0f} ms, "
                f"fan-in last parent -> child {ins[-1]['last_parent_to_child_ms']:.1f} ms",
                file=sys.stderr,
                flush=True,
            )
    finally:
        engine.dispose()
    med = statistics.median
    print(f"\nfan-out 1 -> {n} (median of {repeat}):")
    print(
        f"  parent's result stored (its transaction claims the children): "
        f"{med(o['result_stored_ms'] for o in outs):,.0f} ms"
    )
    print(
        f"  parent's result -> every child dispatched: "
        f"{med(o['all_dispatched_ms'] for o in outs):,.0f} ms"
    )
    print(
        f"  children dispatched: {outs[-1]['children']:.0f}, each once: "
        f"{all(o['each_once'] for o in outs)}"
    )
    print(f"fan-in {n} -> 1 (median of {repeat}):")
    print(
        f"  {n - 1} parents' results as a burst (child waits): "
        f"{med(i['burst_of_n_minus_1_ms'] for i in ins):,.0f} ms"
    )
    print(
        f"  last parent's result -> child dispatched: "
        f"{med(i['last_parent_to_child_ms'] for i in ins):,.1f} ms"
    )
    print(f"  child runs: {ins[-1]['child_runs']:.0f} (1 expected)")
    print(
        f"  {n - 1} parents' results one after another (each its own transaction): "
        f"{med(i['burst_of_n_minus_1_ms'] for i in apart):,.0f} ms"
    )
    print(f"  child runs: {apart[-1]['child_runs']:.0f} (1 expected)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("mysql", "sqlite"), default="mysql")
    p.add_argument(
        "--mysql-url",
        default=os.environ.get("AYS_BENCH_MYSQL_URL", DEFAULT_MYSQL_URL),
        help="server to create ays_t_bench_<hex> on (env AYS_BENCH_MYSQL_URL)",
    )
    p.add_argument("--n", type=int, default=1000, help="children / parents (1000)")
    p.add_argument("--repeat", type=int, default=3, help="rounds, median reported (3)")
    args = p.parse_args(argv)
    print(
        f"dependencies bench: backend {args.backend}, n {args.n}; {load()}; "
        f"Python {platform.python_version()}"
    )
    with database(args.backend, args.mysql_url) as url:
        asyncio.run(bench(url, args.n, args.repeat))
    print(f"after: {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
