#!/usr/bin/env python
"""Console page benchmark: the time to serve each console page, rendered HTML and all, with
10k tasks and 1M job-log rows (the data of bench/console_bench.py, which times the queries
behind them); prints p50/p99 per page over --loads loads (figures, never asserted).

Each page is fetched through the manager's whole app (guard, session cookie, route, template)
with FastAPI's TestClient, signed in once through /login as a browser is.

    .venv/bin/python bench/console_pages_bench.py                      # SQLite and MariaDB
    .venv/bin/python bench/console_pages_bench.py --backend sqlite --rows 200000 --loads 20
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from ays_runtime.manager import forecast, overview  # noqa: E402
from ays_runtime.storage.database import make_engine, utcnow  # noqa: E402
from ays_runtime.storage.models import JobLog  # noqa: E402
from bench.console_bench import (  # noqa: E402
    TOKEN,
    Data,
    Entry,
    app_client,
    database,
    job_row,
    seed,
    time_entry,
)


def _ms(work: object) -> float:
    started = time.perf_counter()
    work()  # type: ignore[operator]
    return (time.perf_counter() - started) * 1000


def dashboard(data: Data, client: TestClient, loads: int) -> None:
    """The dashboard's loads as a manager serves them: none warmed (what a load read before
    keep_warm), after the start's warm-up (overview.warm, as keep_warm runs it), warm, and
    right after new runs arrive in the current minute."""

    def get() -> None:
        answer = client.get("/")
        if answer.status_code != 200:
            raise SystemExit(f"/: {answer.status_code} {answer.text[:300]}")

    overview._KEPT.clear()  # a process that kept nothing
    cold = _ms(get)
    overview._KEPT.clear()
    warm_up = _ms(lambda: overview.warm(data.sessions))
    first = _ms(get)
    warm = sorted(_ms(get) for _ in range(loads))
    rng, now = random.Random(14), utcnow()
    rows = [job_row(rng, task_id, now, ["node-0"], False) for task_id in range(1, 501)]
    with data.sessions() as session:
        session.execute(insert(JobLog), rows)
        session.commit()
    after_new = _ms(get)
    print(
        f"  dashboard: no warm-up {cold:.1f} ms; keep_warm's start read {warm_up:.1f} ms, then "
        f"1st load {first:.1f} ms; warm p50 {warm[len(warm) // 2]:.1f} / max {warm[-1]:.1f} ms "
        f"({loads} loads); after 500 new runs {after_new:.1f} ms",
        flush=True,
    )


def pages(data: Data, client: TestClient) -> list[Entry]:
    def get(name: str, path: str) -> Entry:
        def load() -> object:
            answer = client.get(path)
            if answer.status_code != 200:
                raise SystemExit(f"{path}: {answer.status_code} {answer.text[:300]}")
            return answer

        return Entry(name, load)

    since = (data.now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    until = data.now.strftime("%Y-%m-%dT%H:%M:%S")
    return [
        get("dashboard", "/"),
        get("tasks, page 101", "/tasks?page=101"),
        get("tasks, name search", "/tasks?q=task-12"),
        get("a task's page", f"/tasks/{data.busy_task_id}"),
        get("runs", "/runs"),
        get("runs, failed", "/runs?status=failed"),
        get("runs of a task, 24 h", f"/runs?task_id={data.busy_task_id}&range=24h"),
        get("nodes and groups", "/nodes"),
        get("forecast (24 h)", "/forecast"),
        get("slot view (1 day)", f"/slots?task_id={data.slot_task_id}&since={since}&until={until}"),
    ]


def run_backend(backend: str, args: argparse.Namespace) -> None:
    load = os.getloadavg()
    print(f"\n== {backend}: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    with database(backend, args.mysql_url) as url:
        engine = make_engine(url)
        try:
            data = seed(engine, args.tasks, args.rows, args.days, utcnow())
            if backend == "sqlite":
                with engine.begin() as conn:
                    conn.exec_driver_sql("ANALYZE")
            client = app_client(data.sessions)
            client.headers.pop("Authorization")  # a browser: the session cookie only
            signed = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
            assert signed.status_code == 303, signed.text
            dashboard(data, client, args.loads)
            # As the manager does at start (forecast.keep_warm): the page's forecast computed.
            warmed = _ms(lambda: forecast._warm(data.sessions, *forecast.WARM_AT_START))
            print(f"  forecast: keep_warm's start computation {warmed:.1f} ms", flush=True)
            print(f"  {'page':<22} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'1st ms':>9}  loads")
            for entry in pages(data, client):
                f = time_entry(entry, args.loads)
                print(
                    f"  {entry.name:<22} {f['p50_ms']:9.1f} {f['p99_ms']:9.1f} "
                    f"{f['max_ms']:9.1f} {f['first_ms']:9.1f}  {f['loads']}",
                    flush=True,
                )
            load = os.getloadavg()
            print(f"  load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        finally:
            engine.dispose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=("sqlite", "mysql", "both"), default="both")
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--loads", type=int, default=50)
    p.add_argument(
        "--mysql-url",
        default=os.environ.get(
            "AYS_BENCH_MYSQL_URL", "mysql+pymysql://ays_test:ays_test@127.0.0.1:3306/ays_test"
        ),
    )
    args = p.parse_args(argv)
    for backend in ("sqlite", "mysql") if args.backend == "both" else (args.backend,):
        run_backend(backend, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
