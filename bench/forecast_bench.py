#!/usr/bin/env python
"""Fire forecast page benchmark: the console's /forecast with 10k tasks (and the job log of
bench/console_bench.py, which the forecast does not read), fetched through the manager's whole
app as a signed-in browser does; prints p50/p99 per case (figures, never asserted).

Cases, each in ms over --loads loads:

    cold first load     a process that has parsed nothing and kept nothing: every cache of the
                        forecast and of the schedules (parse, expansions, windows, snapshot)
                        is emptied before each load, as in a fresh process with no warm-up
    first load, warmed  what a manager does at start before anyone asks: the scheduler parses
                        every enabled task's schedule (its first reconcile), then keep_warm
                        computes the console's forecast in the background; both timed apart
                        (`scheduler parse`, `keep_warm`), then the page is loaded
    reload              the page again, the tasks unchanged (the minute's forecast is kept)
    after a task change one task's version bumped before each load: the tasks read again
    ..., kept warm        the same once keep_warm has looked (within 2 s of the change while
                        someone watches the forecast)

    .venv/bin/python bench/forecast_bench.py                          # SQLite and MariaDB
    .venv/bin/python bench/forecast_bench.py --backend sqlite --rows 2000 --loads 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import select, update  # noqa: E402

from ays_runtime.manager import forecast  # noqa: E402
from ays_runtime.scheduler import schedule  # noqa: E402
from ays_runtime.storage.database import make_engine, utcnow  # noqa: E402
from ays_runtime.storage.models import Task  # noqa: E402
from bench.console_bench import TOKEN, Data, app_client, database, seed  # noqa: E402


def forget_everything() -> None:
    """As a fresh process: nothing parsed, expanded or kept."""
    schedule.parse_schedule.cache_clear()
    schedule._expansions.clear()
    schedule.cron_seconds.cache_clear()
    schedule._offset_changes.cache_clear()
    forecast._cron_window.cache_clear()
    forecast._snapshots.clear()


def figures(times: list[float]) -> str:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered):9.1f} {p99:9.1f} {ordered[-1]:9.1f}  {len(ordered)}"


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def run_backend(backend: str, args: argparse.Namespace) -> None:
    load = os.getloadavg()
    print(f"\n== {backend}: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    with database(backend, args.mysql_url) as url:
        engine = make_engine(url)
        try:
            data: Data = seed(engine, args.tasks, args.rows, args.days, utcnow())
            client: TestClient = app_client(data.sessions)
            client.headers.pop("Authorization")  # a browser: the session cookie only
            signed = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
            assert signed.status_code == 303, signed.text

            def page() -> None:
                answer = client.get("/forecast")
                if answer.status_code != 200:
                    raise SystemExit(f"/forecast: {answer.status_code} {answer.text[:300]}")

            with data.sessions() as session:
                enabled = session.execute(
                    select(Task.schedule, Task.timezone).where(Task.enabled.is_(True))
                ).all()
                some_task = session.execute(select(Task.id).limit(1)).scalar_one()

            def scheduler_parse() -> None:
                for expression, zone in enabled:
                    schedule.parse_schedule(expression, zone)

            def warm() -> None:
                forecast._warm(data.sessions, *forecast.WARM_AT_START)

            def bump() -> None:
                with engine.begin() as conn:
                    conn.execute(
                        update(Task).where(Task.id == some_task).values(version=Task.version + 1)
                    )

            page()  # the app's own first request (templates, SQL compiled) is not the forecast's
            print(f"  {'case':<34} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}  loads")
            cold: list[float] = []
            parse: list[float] = []
            warming: list[float] = []
            warmed: list[float] = []
            for _ in range(args.first_loads):
                forget_everything()
                cold.append(timed(page))
                forget_everything()
                parse.append(timed(scheduler_parse))
                warming.append(timed(warm))
                warmed.append(timed(page))
            print(f"  {'cold first load (no warm-up)':<34} {figures(cold)}")
            print(f"  {'  at start: scheduler parse':<34} {figures(parse)}")
            print(f"  {'  at start: keep_warm (background)':<34} {figures(warming)}")
            print(f"  {'first load, warmed at start':<34} {figures(warmed)}")
            print(f"  {'reload':<34} {figures([timed(page) for _ in range(args.loads)])}")
            changed = []
            for _ in range(args.first_loads):
                bump()
                changed.append(timed(page))
            print(f"  {'after a task change':<34} {figures(changed)}")
            changed = []
            for _ in range(args.first_loads):
                bump()
                warm()
                changed.append(timed(page))
            print(f"  {'after a task change, kept warm':<34} {figures(changed)}")
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
    p.add_argument("--loads", type=int, default=50, help="reloads")
    p.add_argument("--first-loads", type=int, default=20, help="cold and warmed first loads")
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
