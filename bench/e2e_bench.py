#!/usr/bin/env python
"""End-to-end benchmark: fire -> run on a node -> result stored; Ays beside Celery. Prints figures.

What runs (everything on 127.0.0.1, every process started here and stopped at the end):

* Ays: a real manager and 1, then 2, nodes as subprocesses (the daemons `aysManager debug` /
  `aysNode debug` run, at INFO logging as a service would), a fresh SQLite database in a temp
  dir per phase (or a fresh MariaDB/MySQL database with --mysql-url), built-in registry and
  transport, `node.max_concurrent_jobs` = --concurrency. A phase is one (task kind, node count):
  `shell` tasks run `true` (a no-op process), `http` tasks GET a tiny threaded HTTP server this
  script starts. For each N in --steps the phase adds tasks (through the API, POST
  /api/v1/tasks) until N exist, all `* * * * * *` (every second) with round_robin routing, waits
  --warmup seconds, then measures the slots scheduled in a window of --seconds seconds starting
  on a whole second. A phase stops stepping at the first N it cannot keep up with.
* Celery (--celery, on by default): beat plus one worker (prefork, --concurrency processes,
  without gossip/mingle/heartbeat) on the local Redis, broker and result backend db 15
  (flushed before and after each step). Beat holds N entries running the same no-op (a task
  doing `subprocess.run(["true"])`) every second. Fresh worker and beat per step.
  --celery-schedule says how the entries fall due:
    aligned   (default) at each whole second, all N at once: the load Ays gets from N tasks on
              `* * * * * *`, a burst of N runs on the second. A bench-only beat schedule
              (celery.schedules has none finer than a minute that is aligned).
    interval  beat's `schedule: 1.0`: each entry 1 s after its own last send. Beat sends a
              second's entries one after another and each keeps its own send time as its next
              one's start, so the N runs spread over the second and drift apart (measured at
              N=100: after 15 s a second's runs spanned 270-310 ms): a smoother load than Ays
              gets, and beat's own lateness moves the intended time instead of counting.

Per fire, from the stored rows (Ays: ays_job_log read directly with SQLAlchemy; Celery: the
result backend's records):

    claim     Ays: created_at - scheduled_at (the slot's job-log row is claimed)
              Celery: when beat published the message - the time beat meant to send it
    start     Ays: started_at - scheduled_at; started_at is the node's reported start of the
              job (it replaces the manager's "dispatch accepted" time when the result arrives)
              Celery: time.time() at the top of the task - the intended time
    stored    Ays: when the manager's UPDATE made the row final - scheduled_at. A bench-only
              trigger (table bench_result_stored, created after the manager migrated the
              schema) records that moment: SQLite strftime('%f', 'now') has millisecond
              resolution, MySQL UTC_TIMESTAMP(6). The trigger adds one insert to each result
              transaction. Without a trigger (no privilege), ended_at (node-reported end) is
              used and the table says so.
              Celery: the result's date_done (set when the backend stores it) - intended.
    intended  Ays: the slot (scheduled_at). Celery: beat's own intended send time, stamped
              into the message by a Scheduler subclass: aligned, the whole second after the
              entry's last send; interval, entry.last_run_at + run_every (relative: an entry's
              next run is counted from when it last actually ran, so a late beat sends fewer
              than N a second).

    done/s    runs whose result was stored (status succeeded) inside the window / window
    keeps up  Ays: every slot of the window fired once and succeeded (after up to --drain
              seconds), and done/s >= 99% of N (no backlog growing).
              Celery: beat sent >= 95% of N/s (its relative schedule drifts a little with every
              late send), every message it sent ran and succeeded, done/s >= 99% of sent/s.

Also printed: CPU of each process during the window (% of one core; a node or worker counts the
jobs it spawned), the machine's load average, and, with --profile, where the manager and the
node(s) spend their time at the highest N of each phase (py-spy samples, after the measured
window so the sampling does not disturb it).

Quick:     .venv/bin/python bench/e2e_bench.py --steps 10,50 --seconds 10
Full:      .venv/bin/python bench/e2e_bench.py --profile --json e2e-results.json
~10 min on 2 CPUs: .venv/bin/python bench/e2e_bench.py --steps 5,10,20,30,50,100,200 \
               --seconds 12 --profile --profile-seconds 8 --json e2e.json
Re-print:  .venv/bin/python bench/e2e_bench.py --from-json e2e.json
Needs the bench extra (pip install -e '.[bench]': celery[redis]) and Redis on 127.0.0.1:6379;
--profile needs py-spy (pip install py-spy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import yaml
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    select,
)
from sqlalchemy.engine import make_url

from ays_runtime.storage.database import make_engine, redacted
from ays_runtime.storage.models import JobLog, RunStatus

GROUP = "bench"
EVERY_SECOND = "* * * * * *"
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
KEEP_UP_SHARE = 0.99
# Celery beat's interval schedule is relative (an entry's next send counts from its actual
# send), so each late send costs a little of the rate: allow it this share of N before saying
# beat does not keep up.
BEAT_DRIFT_SHARE = 0.95
UNFINISHED = (RunStatus.PENDING.value, RunStatus.DISPATCHED.value, RunStatus.RUNNING.value)
BIN = Path(sys.executable).parent

# Every process this script starts; main()'s finally kills whatever is still alive.
PROCS: list[Proc] = []


# --- small helpers ----------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def stats_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else math.nan,
    }


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def ratio(a: float, b: float) -> str:
    if any(v is None or math.isnan(v) for v in (a, b)) or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def load_avg() -> tuple[float, float, float]:
    return os.getloadavg()


def load_text() -> str:
    one, five, fifteen = load_avg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} CPUs)"


def progress(message: str) -> None:
    print(f"  .. [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sleep_until(epoch: float) -> None:
    while (left := epoch - time.time()) > 0:
        time.sleep(min(left, 0.5))


def utc(epoch: float) -> datetime:
    """Naive UTC datetime (the form Ays stores) for a Unix time."""
    return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)


def epoch_of(value: Any) -> float | None:
    """Unix time of a stored value: naive-UTC datetime, ISO string, or None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# --- processes --------------------------------------------------------------------------------


class Proc:
    """A subprocess with its output in a log file, stopped by signal, then killed with its tree."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env or os.environ.copy(),
                cwd=self.cwd,
                start_new_session=True,  # a Ctrl-C on the terminal is ours to handle
            )
        PROCS.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(
                f"{self.name} exited ({self.popen and self.popen.returncode}):\n{self.tail()}"
            )

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, signals: tuple[int, ...] = (signal.SIGINT,), timeout: float = 20) -> None:
        """Send `signals` (a moment apart), wait up to `timeout`, then kill the whole tree."""
        if not self.alive():
            return
        for i, sig in enumerate(signals):
            if i:
                time.sleep(0.3)
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)  # type: ignore[union-attr]
        try:
            self.popen.wait(timeout)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            progress(f"{self.name} did not stop in {timeout:g}s: killing it")
        self.kill_tree()

    def kill_tree(self) -> None:
        if self.popen is None:
            return
        try:
            parent = psutil.Process(self.popen.pid)
            family = [*parent.children(recursive=True), parent]
        except psutil.NoSuchProcess:
            family = []
        for proc in family:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(family, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def cpu_seconds(self) -> float:
        """CPU of the process, its live children, and the children they have reaped."""
        if not self.alive():
            return math.nan
        total = 0.0
        try:
            parent = psutil.Process(self.pid)
            procs = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return math.nan
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total


class CpuMeter:
    """CPU % of one core used by each named process between start() and stop()."""

    def __init__(self, procs: dict[str, list[Proc]]) -> None:
        self.procs = procs
        self._start: dict[str, float] = {}
        self._t0 = 0.0
        self.result: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        return {name: sum(p.cpu_seconds() for p in group) for name, group in self.procs.items()}

    def start(self) -> None:
        self._t0 = time.monotonic()
        psutil.cpu_percent()  # primes the machine-wide counter
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._t0
        end = self._sample()
        self.result = {name: 100 * (end[name] - self._start[name]) / elapsed for name in self.procs}
        self.result["machine"] = psutil.cpu_percent() * (os.cpu_count() or 1)
        return self.result


# --- the local HTTP endpoint the http tasks call ----------------------------------------------

HTTP_TARGET = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer.request_queue_size = 1024
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
server.daemon_threads = True
server.serve_forever()
"""


def start_http_target(tmp: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        "http-target", [sys.executable, "-c", HTTP_TARGET, str(port)], tmp / "http-target.log"
    ).start()
    url = f"http://127.0.0.1:{port}/noop"

    def answers() -> bool:
        proc.check_alive()
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, 10, "the HTTP target")
    return proc, url


# --- Ays ----------------------------------------------------------------------------------------

# The daemons as `aysManager debug` / `aysNode debug` run them, but at INFO (a service's level):
# debug logging would add a few log lines per run to what is measured.
LAUNCH = r"""
import sys
from pathlib import Path
from ays_runtime.config import load_config_file
from ays_runtime.logs import configure_logging

configure_logging(debug=False)
role, path = sys.argv[1], Path(sys.argv[2])
config = load_config_file(path)
if role == "manager":
    from ays_runtime.manager.service import run_manager
    run_manager(config)
else:
    from ays_runtime.node.daemon import run_node
    sys.exit(run_node(config))
"""

STORED = Table(
    "bench_result_stored",
    MetaData(),
    Column(
        "job_log_id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=False,
    ),
    Column("stored_at", String(32), nullable=False),
)
_FINAL_SQL = ", ".join(f"'{s.value}'" for s in RunStatus if s.is_final)
_UNFINISHED_SQL = ", ".join(f"'{s}'" for s in UNFINISHED)
SQLITE_TRIGGER = f"""
CREATE TRIGGER bench_result_stored_trg AFTER UPDATE OF status ON ays_job_log
FOR EACH ROW WHEN NEW.status IN ({_FINAL_SQL}) AND OLD.status IN ({_UNFINISHED_SQL})
BEGIN
  INSERT OR REPLACE INTO bench_result_stored (job_log_id, stored_at)
  VALUES (NEW.id, strftime('%Y-%m-%d %H:%M:%f', 'now'));
END
"""
MYSQL_TRIGGER = f"""
CREATE TRIGGER bench_result_stored_trg AFTER UPDATE ON ays_job_log
FOR EACH ROW BEGIN
  IF NEW.status IN ({_FINAL_SQL}) AND OLD.status IN ({_UNFINISHED_SQL}) THEN
    REPLACE INTO bench_result_stored (job_log_id, stored_at)
    VALUES (NEW.id, CAST(UTC_TIMESTAMP(6) AS CHAR));
  END IF;
END
"""


@contextlib.contextmanager
def ays_database(tmp: Path, mysql_url: str | None) -> Iterator[str]:
    """An empty database for one phase (the manager migrates it at start)."""
    if not mysql_url:
        yield f"sqlite:///{tmp / 'ays.db'}"
        return
    server = make_url(mysql_url)
    server = server.set(database=None, query={**server.query, "charset": "utf8mb4"})
    admin = create_engine(server)
    name = f"ays_t_e2e_{secrets.token_hex(4)}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield make_url(mysql_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql("SET SESSION lock_wait_timeout = 30")
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


@dataclass
class AysCluster:
    tmp: Path
    storage_url: str
    node_count: int
    concurrency: int
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    manager_port: int = field(default_factory=free_port)
    manager: Proc | None = None
    nodes: list[Proc] = field(default_factory=list)
    task_ids: list[int] = field(default_factory=list)
    engine: Engine | None = None
    stored_trigger: bool = False

    def _config(self, name: str, node_port: int | None = None) -> Path:
        config: dict[str, Any] = {
            "env": "dev",
            "access_token": self.token,
            "storage": {"url": self.storage_url},
            # Registry and transport at their defaults (heartbeat 10 s, offline after 3 missed).
            "registry": {"backend": "builtin"},
            "transport": {"backend": "builtin"},
            "manager": {
                "ip": "127.0.0.1",
                "port": self.manager_port,
                "data_dir": str(self.tmp / "manager"),
            },
            "node": {
                "ip": "127.0.0.1",
                "port": node_port or free_port(),
                "group": GROUP,
                "data_dir": str(self.tmp / name),
                "max_concurrent_jobs": self.concurrency,
                "kill_grace": 1,
            },
        }
        path = self.tmp / f"{name}.yaml"
        path.touch(mode=0o600)
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.manager_port}/api/v1",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )

    def start(self) -> None:
        config = self._config("manager")
        self.manager = Proc(
            "aysManager",
            [sys.executable, "-c", LAUNCH, "manager", str(config)],
            self.tmp / "manager.log",
        ).start()
        wait_for(lambda: _healthy(self.manager, self.manager_port), 60, "the manager")  # type: ignore[arg-type]
        self.engine = make_engine(self.storage_url)
        self.stored_trigger = install_stored_trigger(self.engine)
        with self.api() as api:
            response = api.post("/node-groups", json={"name": GROUP})
            if response.status_code != 201:
                raise RuntimeError(f"cannot create node group: {response.text}")
        for i in range(self.node_count):
            port = free_port()
            config = self._config(f"node{i}", port)
            node = Proc(
                f"aysNode {i}",
                [sys.executable, "-c", LAUNCH, "node", str(config)],
                self.tmp / f"node{i}.log",
            ).start()
            self.nodes.append(node)
            wait_for(lambda n=node, p=port: _healthy(n, p), 60, f"node {i}")

        def online() -> bool:
            with self.api() as api:
                items = api.get("/nodes", params={"status": "online"}).json()["items"]
            return len(items) == self.node_count

        wait_for(online, 30, f"{self.node_count} node(s) online", interval=0.3)

    def ensure_tasks(self, kind: str, count: int, http_url: str | None) -> None:
        """Add tasks through the API until `count` exist (each fires every second)."""
        with self.api() as api:
            while len(self.task_ids) < count:
                i = len(self.task_ids)
                payload = {"command": "true"} if kind == "shell" else {"url": http_url}
                response = api.post(
                    "/tasks",
                    json={
                        "name": f"e2e-{kind}-{i:04d}",
                        "node_group": GROUP,
                        "schedule": EVERY_SECOND,
                        "task_type": kind,
                        "payload": payload,
                        "route_strategy": "round_robin",
                        "timeout_s": 30,
                    },
                )
                if response.status_code != 201:
                    raise RuntimeError(f"cannot create task {i}: {response.text}")
                self.task_ids.append(int(response.json()["id"]))

    def check_alive(self) -> None:
        for proc in [self.manager, *self.nodes]:
            if proc is not None:
                proc.check_alive()

    def stop(self) -> None:
        # The manager first (firing stops, deliveries in flight finish), then the nodes with a
        # second SIGINT (held runs killed at once; results go to the spool if not taken).
        if self.manager is not None:
            self.manager.stop((signal.SIGINT,), timeout=30)
        for node in self.nodes:
            node.stop((signal.SIGINT, signal.SIGINT), timeout=15)
        if self.engine is not None:
            self.engine.dispose()


def _healthy(proc: Proc, port: int) -> bool:
    proc.check_alive()
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def install_stored_trigger(engine: Engine) -> bool:
    """Record when each row's result is stored; False when the database refuses a trigger."""
    STORED.create(engine, checkfirst=True)
    ddl = SQLITE_TRIGGER if engine.dialect.name == "sqlite" else MYSQL_TRIGGER
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(ddl)
    except Exception as err:  # noqa: BLE001 - e.g. no TRIGGER privilege on MySQL
        progress(f"no result-stored trigger ({str(err).splitlines()[0]}): using ended_at")
        return False
    return True


def read_rows(engine: Engine, task_ids: list[int], since: datetime) -> list[dict[str, Any]]:
    stmt = (
        select(
            JobLog.id,
            JobLog.scheduled_at,
            JobLog.created_at,
            JobLog.started_at,
            JobLog.ended_at,
            JobLog.status,
            JobLog.attempt,
            STORED.c.stored_at,
        )
        .outerjoin(STORED, STORED.c.job_log_id == JobLog.id)
        .where(JobLog.scheduled_at >= since, JobLog.task_id.in_(task_ids))
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).mappings().all()
    out = []
    for r in rows:
        out.append(
            {
                "id": r["id"],
                "scheduled": epoch_of(r["scheduled_at"]),
                "created": epoch_of(r["created_at"]),
                "started": epoch_of(r["started_at"]),
                "ended": epoch_of(r["ended_at"]),
                "stored": epoch_of(r["stored_at"]),
                "status": r["status"],
                "attempt": r["attempt"],
            }
        )
    return out


def unfinished_in(engine: Engine, task_ids: list[int], t0: float, t1: float) -> tuple[int, int]:
    """(rows of slots in [t0, t1), of which unfinished)."""
    stmt = select(JobLog.status).where(
        JobLog.scheduled_at >= utc(t0),
        JobLog.scheduled_at < utc(t1),
        JobLog.attempt == 0,
        JobLog.task_id.in_(task_ids),
    )
    with engine.connect() as conn:
        statuses = conn.execute(stmt).scalars().all()
    return len(statuses), sum(1 for s in statuses if s in UNFINISHED)


def measure_ays_step(
    cluster: AysCluster, kind: str, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    assert cluster.engine is not None and cluster.manager is not None
    t0 = float(math.ceil(time.time() + args.warmup))
    t1 = t0 + args.seconds
    meter = CpuMeter({"manager": [cluster.manager], "nodes": cluster.nodes})
    sleep_until(t0)
    load_start = load_avg()
    meter.start()
    sleep_until(t1)
    cpu = meter.stop()
    load_end = load_avg()
    cluster.check_alive()
    expected = n * args.seconds
    deadline = time.time() + args.drain
    while True:
        fired, left = unfinished_in(cluster.engine, cluster.task_ids, t0, t1)
        if (fired >= expected and left == 0) or time.time() > deadline:
            break
        time.sleep(0.5)
    drained_after = time.time() - t1
    rows = read_rows(cluster.engine, cluster.task_ids, utc(t0 - 60))
    return summarise_step(
        system="ays",
        kind=kind,
        nodes=cluster.node_count,
        n=n,
        args=args,
        t0=t0,
        t1=t1,
        expected=expected,
        window=[r for r in rows if r["attempt"] == 0 and t0 <= r["scheduled"] < t1],
        all_rows=rows,
        done_key="stored" if cluster.stored_trigger else "ended",
        claim_key="created",
        cpu=cpu,
        load=(load_start, load_end),
        drained_after=drained_after,
    )


def summarise_step(
    *,
    system: str,
    kind: str,
    nodes: int,
    n: int,
    args: argparse.Namespace,
    t0: float,
    t1: float,
    expected: int,
    window: list[dict[str, Any]],
    all_rows: list[dict[str, Any]],
    done_key: str,
    claim_key: str,
    cpu: dict[str, float],
    load: tuple[tuple[float, float, float], tuple[float, float, float]],
    drained_after: float,
    sent: int | None = None,
) -> dict[str, Any]:
    """One step's figures from its rows: each row has scheduled (intended), claim_key, started,
    ended, done_key times (Unix seconds) and a status."""
    ok = [r for r in window if r["status"] == "succeeded"]
    failed = [r for r in window if r["status"] not in UNFINISHED and r["status"] != "succeeded"]
    unfinished = len(window) - len(ok) - len(failed)
    done_in_window = sum(
        1
        for r in all_rows
        if r["status"] == "succeeded" and r[done_key] is not None and t0 <= r[done_key] < t1
    )
    throughput = done_in_window / (t1 - t0)
    if sent is None:  # Ays: every slot of the window must have fired
        fired = len(window)
        keeps_up = fired == expected and len(ok) == expected and throughput >= KEEP_UP_SHARE * n
    else:  # Celery: beat's own sends (its interval schedule drifts), within BEAT_DRIFT_SHARE
        fired = sent
        keeps_up = (
            fired >= BEAT_DRIFT_SHARE * expected
            and len(ok) == fired
            and throughput >= KEEP_UP_SHARE * fired / (t1 - t0)
        )

    def lat(key: str) -> dict[str, float]:
        return stats_ms([r[key] - r["scheduled"] for r in ok if r[key] is not None])

    return {
        "system": system,
        "kind": kind,
        "nodes": nodes,
        "n": n,
        "window_s": t1 - t0,
        "expected": expected,
        "fired": fired,
        "succeeded": len(ok),
        "failed": len(failed),
        "failure_statuses": Counter(r["status"] for r in failed).most_common(3),
        "unfinished": unfinished,
        "done_per_s": throughput,
        "keeps_up": keeps_up,
        "claim": lat(claim_key),
        "start": lat("started"),
        "stored": lat(done_key),
        "ended": lat("ended"),
        "stored_is": done_key,
        "cpu_pct": cpu,
        "load_start": load[0],
        "load_end": load[1],
        "drained_after_s": drained_after,
    }


# --- profiling (py-spy) -----------------------------------------------------------------------


def py_spy_record(procs: dict[str, Proc], seconds: float, out_dir: Path) -> dict[str, Path]:
    """Sample every process at once for `seconds`; returns the raw (collapsed) stack files."""
    py_spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if py_spy is None:
        progress("py-spy not found (pip install py-spy): no profile")
        return {}
    running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for attempt in range(3):  # py-spy sometimes fails to read a busy interpreter's version
        for name, proc in procs.items():
            if name in running and running[name][0].returncode == 0:
                continue
            out = out_dir / f"profile-{name.replace(' ', '-')}.txt"
            cmd = [
                py_spy,
                "record",
                "--pid",
                str(proc.pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "100",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(out),
            ]
            running[name] = (
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                out,
            )
        for popen, _out in running.values():
            try:
                popen.wait(seconds + 30)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        if all(p.returncode == 0 for p, _ in running.values()):
            break
        progress(f"py-spy attempt {attempt + 1} failed for some process; again")
    return {name: out for name, (p, out) in running.items() if p.returncode == 0 and out.exists()}


def _where(frame: str) -> tuple[str, str]:
    """('func', 'path') of a py-spy frame `func (path:line)`."""
    func, _, rest = frame.partition(" (")
    return func, rest.rsplit(":", 1)[0]


def _library(path: str) -> str:
    if "ays_runtime/" in path:
        return "ays_runtime/" + path.split("ays_runtime/", 1)[1]
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/lib/python3" in path:
        tail = path.split("/lib/python3", 1)[1].split("/", 1)[1]
        return "stdlib:" + tail.split("/", 1)[0].removesuffix(".py")
    return path


def summarise_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Self time by library, time by innermost Ays function, event loop vs worker threads."""
    by_library: Counter[str] = Counter()
    by_ays: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaf_func, leaf_path = _where(frames[-1])
        by_library[f"{_library(leaf_path)} {leaf_func}"] += count
        owner = "(no Ays frame)"
        for frame in reversed(frames):
            func, where = _where(frame)
            if "ays_runtime/" in where:
                owner = f"{_library(where)}:{func}"
                break
        by_ays[owner] += count
        root = " ".join(_where(frames[0]))
        threads["worker threads" if "threading" in root else "main (event loop)"] += count
    share = {k: 100 * v / total for k, v in threads.items()} if total else {}
    return {
        "samples": total,
        "threads_pct": share,
        "self_top": [(k, 100 * v / total) for k, v in by_library.most_common(top)],
        "ays_top": [(k, 100 * v / total) for k, v in by_ays.most_common(top)],
    }


# --- an Ays phase -----------------------------------------------------------------------------


def run_ays_phase(
    args: argparse.Namespace, kind: str, nodes: int, http_url: str | None, out_dir: Path
) -> dict[str, Any]:
    progress(f"Ays phase: {kind} tasks, {nodes} node(s)")
    steps: list[dict[str, Any]] = []
    profile: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="ays-e2e-") as tmp_name,
        ays_database(Path(tmp_name), args.mysql_url) as url,
    ):
        cluster = AysCluster(Path(tmp_name), url, nodes, args.concurrency)
        try:
            cluster.start()
            for n in args.steps:
                started = time.monotonic()
                cluster.ensure_tasks(kind, n, http_url)
                progress(f"  N={n}: tasks ready in {time.monotonic() - started:.1f}s; measuring")
                step = measure_ays_step(cluster, kind, n, args)
                steps.append(step)
                progress(
                    f"  N={n}: {step['done_per_s']:.1f} done/s, "
                    f"{step['succeeded']}/{step['expected']} ok, keeps up: {step['keeps_up']}"
                )
                if not step["keeps_up"]:
                    break
            if args.profile:
                progress(
                    f"  profiling manager and node(s) at N={steps[-1]['n']} for "
                    f"{args.profile_seconds:g}s"
                )
                procs = {
                    "manager": cluster.manager,
                    **{f"node{i}": p for i, p in enumerate(cluster.nodes)},
                }
                files = py_spy_record(procs, args.profile_seconds, Path(tmp_name))  # type: ignore[arg-type]
                for name, path in files.items():
                    profile[name] = summarise_profile(path)
                    keep = out_dir / f"profile-{kind}-{nodes}n-{name}.txt"
                    shutil.copy(path, keep)
                    profile[name]["raw"] = str(keep)
        finally:
            cluster.stop()
            logs = out_dir / f"logs-{kind}-{nodes}n"
            logs.mkdir(exist_ok=True)
            for log in Path(tmp_name).glob("*.log"):
                shutil.copy(log, logs / log.name)
    return {
        "kind": kind,
        "nodes": nodes,
        "steps": steps,
        "profile": profile,
        "profile_n": steps[-1]["n"] if steps and profile else None,
    }


# --- Celery -------------------------------------------------------------------------------------

CELERY_APP = r'''
"""Celery side of bench/e2e_bench.py (written by it into a temp dir)."""
import math
import os
import subprocess
import time
from datetime import timezone
from types import SimpleNamespace

import redis
from celery import Celery, signals
from celery.beat import Scheduler
from celery.schedules import schedstate, schedule

URL = os.environ["AYS_BENCH_REDIS_URL"]
N = int(os.environ.get("AYS_BENCH_TASKS", "0"))
ALIGNED = os.environ.get("AYS_BENCH_SCHEDULE", "aligned") == "aligned"


class every_whole_second(schedule):
    """Due at each whole second, as `* * * * * *` in cron: every entry falls due in the same
    instant. (A slot missed by a beat later than a whole second is skipped.)"""

    def __init__(self):
        super().__init__(run_every=1.0)

    def is_due(self, last_run_at):
        now = time.time()
        due = math.floor(now) > math.floor(epoch(last_run_at))
        # Wake just past the next whole second (beat's heap counts in whole seconds).
        return schedstate(due, math.floor(now) + 1.0005 - now)


def epoch(moment):
    """A beat datetime (naive ones are UTC: enable_utc) as a Unix time."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def intended(entry):
    """The time the entry was meant to be sent this time, as a Unix time."""
    if ALIGNED:
        return math.floor(epoch(entry.last_run_at)) + 1.0
    return epoch(entry.last_run_at) + entry.schedule.run_every.total_seconds()


app = Celery("ays_bench_celery", broker=URL, backend=URL)
app.conf.update(
    enable_utc=True,
    timezone="UTC",
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    result_expires=3600,
    beat_schedule={
        f"noop-{i:04d}": {
            "task": "bench.noop",
            "schedule": every_whole_second() if ALIGNED else 1.0,
        }
        for i in range(N)
    },
)
_redis = redis.Redis.from_url(URL)


@app.task(name="bench.noop")
def noop(intended=None, entry=None):
    start = time.time()
    subprocess.run(["true"], check=True)
    return {"intended": intended, "entry": entry, "start": start, "end": time.time()}


@signals.worker_ready.connect
def _ready(**_kwargs):
    _redis.set("ays_bench:ready", time.time())


class BenchScheduler(Scheduler):
    """Beat's in-memory scheduler, stamping each message with the time beat meant to send it
    (intended()) and noting (intended, sent, entry) in Redis. The notes are written once beat
    has nothing due, in one round trip, so that the bench's own writes do not slow beat's
    sends of a burst."""

    _notes = []

    def tick(self, *args, **kwargs):
        delay = super().tick(*args, **kwargs)
        if delay and self._notes:
            _redis.rpush("ays_bench:sent", *self._notes)
            self._notes.clear()
        return delay

    def apply_async(self, entry, producer=None, advance=True, **kwargs):
        meant = intended(entry)
        stamped = SimpleNamespace(
            name=entry.name,
            task=entry.task,
            args=entry.args,
            kwargs={**entry.kwargs, "intended": meant, "entry": entry.name},
            options=entry.options,
        )
        if advance:
            self.reserve(entry)
        result = super().apply_async(stamped, producer, advance=False, **kwargs)
        self._notes.append(f"{meant},{time.time()},{entry.name}")
        return result
'''


class CeleryRig:
    def __init__(self, tmp: Path, redis_url: str, concurrency: int, schedule: str) -> None:
        import redis  # the bench extra: celery[redis]

        self.tmp = tmp
        self.redis_url = redis_url
        self.concurrency = concurrency
        self.schedule = schedule
        self.redis = redis.Redis.from_url(redis_url)
        (tmp / "ays_bench_celery.py").write_text(CELERY_APP, encoding="utf-8")
        self.celery = str(BIN / "celery")

    def env(self, n: int) -> dict[str, str]:
        env = os.environ.copy()
        env["PYTHONPATH"] = str(self.tmp) + os.pathsep + env.get("PYTHONPATH", "")
        env["AYS_BENCH_REDIS_URL"] = self.redis_url
        env["AYS_BENCH_TASKS"] = str(n)
        env["AYS_BENCH_SCHEDULE"] = self.schedule
        return env

    def step(self, n: int, args: argparse.Namespace) -> dict[str, Any]:
        self.redis.flushdb()
        worker = beat = None
        try:
            worker = Proc(
                "celery worker",
                [
                    self.celery,
                    "-A",
                    "ays_bench_celery",
                    "worker",
                    "-P",
                    "prefork",
                    "-c",
                    str(self.concurrency),
                    "-l",
                    "WARNING",
                    "-n",
                    "ays-bench@localhost",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                self.tmp / f"worker-{n}.log",
                env=self.env(n),
                cwd=self.tmp,
            ).start()
            wait_for(
                lambda: worker.check_alive() or self.redis.get("ays_bench:ready"),  # type: ignore[union-attr]
                60,
                "the celery worker",
            )
            beat = Proc(
                "celery beat",
                [
                    self.celery,
                    "-A",
                    "ays_bench_celery",
                    "beat",
                    "-S",
                    "ays_bench_celery:BenchScheduler",
                    "-l",
                    "WARNING",
                    "--max-interval",
                    "1",
                    "-s",
                    str(self.tmp / f"beat-{n}.schedule"),
                ],
                self.tmp / f"beat-{n}.log",
                env=self.env(n),
                cwd=self.tmp,
            ).start()
            beat_started = time.time()
            # The first sends are due 1 s after beat has loaded its schedule.
            t0 = float(math.ceil(beat_started + 1.5 + args.warmup))
            t1 = t0 + args.seconds
            meter = CpuMeter({"beat": [beat], "worker": [worker]})
            sleep_until(t0)
            load_start = load_avg()
            meter.start()
            sleep_until(t1)
            cpu = meter.stop()
            load_end = load_avg()
            worker.check_alive()
            beat.check_alive()
            deadline = time.time() + args.drain
            while True:
                sent, results = self.read(t0 - 60)
                sent_in = [s for s in sent if t0 <= s[0] < t1]
                done_in = [r for r in results if t0 <= r["scheduled"] < t1]
                if (len(done_in) >= len(sent_in) and time.time() > t1 + 1.5) or (
                    time.time() > deadline
                ):
                    break
                time.sleep(1.0)
            drained_after = time.time() - t1
        finally:
            # Beat first (no more sends). Its state is in memory: a short wait, then a kill (a
            # SIGTERM that lands inside a Redis read is swallowed by beat's error handling).
            if beat is not None:
                beat.stop((signal.SIGTERM,), timeout=5)
            if worker is not None:  # warm shutdown: the tasks it holds finish
                worker.stop((signal.SIGTERM,), timeout=15)
        sent, results = self.read(t0 - 60)  # what was stored while they stopped counts too
        sent_in = [s for s in sent if t0 <= s[0] < t1]
        done_in = [r for r in results if t0 <= r["scheduled"] < t1]
        # Keyed by entry too: on the aligned schedule every entry has the same intended time.
        sent_at = {(intended, entry): at for intended, at, entry in sent}
        for r in results:
            r["claimed"] = sent_at.get((r["scheduled"], r["entry"]))
        step = summarise_step(
            system="celery",
            kind="shell",
            nodes=1,
            n=n,
            args=args,
            t0=t0,
            t1=t1,
            expected=n * args.seconds,
            window=done_in,
            all_rows=results,
            done_key="stored",
            claim_key="claimed",
            cpu=cpu,
            load=(load_start, load_end),
            drained_after=drained_after,
            sent=len(sent_in),
        )
        step["unfinished"] = len(sent_in) - len(done_in)
        step["schedule"] = self.schedule
        self.redis.flushdb()
        return step

    def read(self, since: float) -> tuple[list[tuple[float, float, str]], list[dict[str, Any]]]:
        """Beat's sends (intended, sent, entry name), and each stored result as a row."""
        sent = []
        for item in self.redis.lrange("ays_bench:sent", 0, -1):
            intended, at, entry = item.decode().split(",")
            sent.append((float(intended), float(at), entry))
        keys = list(self.redis.scan_iter("celery-task-meta-*", count=1000))
        results = []
        for start in range(0, len(keys), 1000):
            for raw in self.redis.mget(keys[start : start + 1000]):
                if raw is None:
                    continue
                meta = json.loads(raw)
                value = meta.get("result") if isinstance(meta.get("result"), dict) else {}
                intended = value.get("intended")
                if intended is None or intended < since:
                    continue
                results.append(
                    {
                        "scheduled": intended,
                        "entry": value.get("entry"),
                        "started": value.get("start"),
                        "ended": value.get("end"),
                        "stored": epoch_of(meta.get("date_done")),
                        "status": "succeeded" if meta.get("status") == "SUCCESS" else "failed",
                        "attempt": 0,
                    }
                )
        return sent, results


def run_celery(args: argparse.Namespace) -> list[dict[str, Any]]:
    progress(
        f"Celery: beat + 1 worker (prefork, concurrency {args.concurrency}), "
        f"{args.celery_schedule} schedule, {redacted(args.redis_url)}"
    )
    steps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ays-e2e-celery-") as tmp:
        rig = CeleryRig(Path(tmp), args.redis_url, args.concurrency, args.celery_schedule)
        try:
            for n in args.steps:
                step = rig.step(n, args)
                steps.append(step)
                progress(
                    f"  N={n}: {step['done_per_s']:.1f} done/s, {step['succeeded']}/"
                    f"{step['expected']} ok ({step['fired']} sent), keeps up: {step['keeps_up']}"
                )
                if not step["keeps_up"] and not args.celery_all_steps:
                    break
        finally:
            rig.redis.flushdb()
            if args.keep_logs:
                for log in Path(tmp).glob("*.log"):
                    shutil.copy(log, Path(args.keep_logs) / f"celery-{log.name}")
    return steps


# --- report -------------------------------------------------------------------------------------


def lat_pair(step: dict[str, Any], key: str) -> str:
    s = step[key]
    return f"{fmt(s['p50_ms'])}/{fmt(s['p99_ms'])}"


def print_steps(title: str, steps: list[dict[str, Any]], procs: tuple[str, ...]) -> None:
    print(f"\n{title}")
    head = (
        f"{'kind':<5} {'nodes':>5} {'N':>5} {'expect':>7} {'fired':>6} {'ok':>6} {'fail':>5} "
        f"{'left':>5} {'done/s':>7} {'keeps':>5} {'claim p50/p99':>14} {'start p50/p99':>14} "
        f"{'stored p50/p99':>15} " + " ".join(f"{p + ' CPU':>11}" for p in procs) + f" {'load1':>6}"
    )
    print(head)
    print("-" * len(head))
    for s in steps:
        print(
            f"{s['kind']:<5} {s['nodes']:>5} {s['n']:>5} {s['expected']:>7} {s['fired']:>6} "
            f"{s['succeeded']:>6} {s['failed']:>5} {s['unfinished']:>5} "
            f"{s['done_per_s']:>7.1f} {'yes' if s['keeps_up'] else 'NO':>5} "
            f"{lat_pair(s, 'claim'):>14} {lat_pair(s, 'start'):>14} {lat_pair(s, 'stored'):>15} "
            + " ".join(f"{fmt(s['cpu_pct'].get(p)) + '%':>11}" for p in procs)
            + f" {s['load_end'][0]:>6.2f}"
        )


def print_failures(steps: list[dict[str, Any]]) -> None:
    for s in steps:
        if s["failed"] or s["unfinished"]:
            how = ", ".join(f"{n} {status}" for status, n in s["failure_statuses"]) or "none"
            print(
                f"  {s['system']} {s['kind']} {s['nodes']} node(s) N={s['n']}: failed: {how}; "
                f"not finished {s['drained_after_s']:.0f} s after the window: {s['unfinished']}"
            )


def best(steps: list[dict[str, Any]]) -> int | None:
    kept = [s["n"] for s in steps if s["keeps_up"]]
    return max(kept) if kept else None


def best_complete(steps: list[dict[str, Any]]) -> int | None:
    done = [s["n"] for s in steps if s["succeeded"] == s["fired"] == s["expected"]]
    return max(done) if done else None


def celery_schedule(celery: list[dict[str, Any]]) -> str:
    """How the Celery steps' entries fell due (a --json of before the option: interval)."""
    return str(celery[0].get("schedule", "interval")) if celery else "interval"


def print_side_by_side(phase: dict[str, Any], celery: list[dict[str, Any]]) -> None:
    by_n = {s["n"]: s for s in celery}
    pairs = [(a, by_n[a["n"]]) for a in phase["steps"] if a["n"] in by_n]
    if not pairs:
        return
    job = "the same no-op (`true`)" if phase["kind"] == "shell" else "an HTTP GET (Celery: `true`)"
    print(
        f"\nSide by side, same N, {job}: Ays (manager + {phase['nodes']} node(s), "
        f"{phase['kind']}) vs Celery (beat + 1 worker, {celery_schedule(celery)} schedule); "
        "ratio = Ays / Celery (done/s: higher is better for Ays; latency: lower is better for "
        "Ays)"
    )
    head = (
        f"{'N':>5} | {'done/s Ays':>10} {'Celery':>7} {'ratio':>6} | "
        f"{'start p50 Ays':>13} {'Celery':>7} {'ratio':>6} | {'start p99 Ays':>13} {'Celery':>7} "
        f"{'ratio':>6} | {'stored p50 Ays':>14} {'Celery':>7} {'ratio':>6} | "
        f"{'stored p99 Ays':>14} {'Celery':>7} {'ratio':>6}"
    )
    print(head)
    print("-" * len(head))
    for a, c in pairs:
        cols = [
            f"{a['n']:>5} | {a['done_per_s']:>10.1f} {c['done_per_s']:>7.1f} "
            f"{ratio(a['done_per_s'], c['done_per_s']):>6}"
        ]
        for key, pct, width in (
            ("start", "p50_ms", 13),
            ("start", "p99_ms", 13),
            ("stored", "p50_ms", 14),
            ("stored", "p99_ms", 14),
        ):
            av, cv = a[key][pct], c[key][pct]
            cols.append(f"{fmt(av) + ' ms':>{width}} {fmt(cv):>7} {ratio(av, cv):>6}")
        print(" | ".join(cols))


def print_profile(phase: dict[str, Any]) -> None:
    for name, prof in phase["profile"].items():
        threads = ", ".join(f"{k} {v:.0f}%" for k, v in sorted(prof["threads_pct"].items()))
        print(
            f"\nProfile: {name}, {phase['kind']} tasks, {phase['nodes']} node(s), "
            f"N={phase['profile_n']} ({prof['samples']} py-spy samples, non-idle; {threads})"
        )
        print(
            "  innermost Ays function on the stack (inclusive of what it calls; "
            "run_manager/run_node = the event loop itself, ConnectionCloser = the whole API "
            "request under it, (no Ays frame) = thread-pool and library internals):"
        )
        for key, pct in prof["ays_top"]:
            print(f"    {pct:5.1f}%  {key}")
        print("  leaf frames (self time), by library:")
        for key, pct in prof["self_top"]:
            print(f"    {pct:5.1f}%  {key}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def int_list(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: want integers like 10,50,100") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: want positive integers")
        return sorted(set(values))

    p.add_argument(
        "--steps",
        type=int_list,
        default=[10, 50, 100, 200],
        help="tasks (= fires per second) per step, ascending (default 10,50,100,200)",
    )
    p.add_argument("--seconds", type=int, default=20, help="measured window per step (20)")
    p.add_argument(
        "--warmup",
        type=float,
        default=3.0,
        help="seconds between the step's tasks being in place and the window (3)",
    )
    p.add_argument(
        "--drain",
        type=float,
        default=15.0,
        help="at most this long after the window for its runs to finish (15)",
    )
    p.add_argument("--nodes", type=int_list, default=[1, 2], help="node counts (1,2)")
    p.add_argument("--kinds", default="shell,http", help="task kinds: shell,http")
    p.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="node max_concurrent_jobs and Celery worker concurrency (16)",
    )
    p.add_argument(
        "--mysql-url",
        default=None,
        help="MariaDB/MySQL server to create ays_t_e2e_<hex> on (default: SQLite)",
    )
    p.add_argument(
        "--celery",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the Celery side too (default on)",
    )
    p.add_argument(
        "--celery-all-steps",
        action="store_true",
        help="go on stepping Celery after a step it cannot keep up with",
    )
    p.add_argument(
        "--celery-schedule",
        choices=("aligned", "interval"),
        default="aligned",
        help="Celery's entries fall due all at each whole second, as Ays's tasks on "
        "* * * * * * do (aligned, default), or each 1 s after its own last send (interval: "
        "beat's `schedule: 1.0`, spread over the second)",
    )
    p.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS,
        help=f"Celery broker and backend; FLUSHED (default {DEFAULT_REDIS})",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the manager and nodes at the highest N of each Ays phase",
    )
    p.add_argument("--profile-seconds", type=float, default=10.0)
    p.add_argument("--json", type=Path, help="write every figure to this file")
    p.add_argument(
        "--keep-logs",
        type=Path,
        help="copy daemon logs and raw profiles here (default: a temp dir, printed)",
    )
    p.add_argument(
        "--from-json",
        type=Path,
        help="print the tables of an earlier run's --json file and exit (runs nothing)",
    )
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for kind in args.kinds:
        if kind not in ("shell", "http"):
            p.error(f"--kinds: {kind!r} is not a task kind: use shell and/or http")
    if args.seconds < 1:
        p.error("--seconds must be at least 1")
    if args.celery and urlsplit(args.redis_url).hostname not in ("127.0.0.1", "localhost"):
        p.error("--redis-url: only a local Redis (127.0.0.1) is used by this benchmark")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        print_report(json.loads(args.from_json.read_text(encoding="utf-8")))
        return 0

    def terminated(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    out_dir = args.keep_logs or Path(tempfile.mkdtemp(prefix="ays-e2e-out-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    args.keep_logs = out_dir
    began = time.time()
    load_before = load_text()
    report: dict[str, Any] = {
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k != "mysql_url"
        },
        "storage": "mysql" if args.mysql_url else "sqlite",
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_before": load_before,
        },
        "ays": [],
        "celery": [],
    }
    progress(f"start; {load_before}; logs and raw profiles in {out_dir}")
    http_target: Proc | None = None
    try:
        http_url = None
        if "http" in args.kinds:
            http_target, http_url = start_http_target(out_dir)
        for nodes in args.nodes:
            for kind in args.kinds:
                report["ays"].append(run_ays_phase(args, kind, nodes, http_url, out_dir))
        if args.celery:
            report["celery"] = run_celery(args)
    except KeyboardInterrupt:
        progress("interrupted: stopping everything")
        raise
    finally:
        if http_target is not None:
            http_target.stop((signal.SIGTERM,), timeout=5)
        for proc in PROCS:
            if proc.alive():
                proc.kill_tree()
    report["machine"]["load_after"] = load_text()
    report["elapsed_s"] = time.time() - began
    report["celery_version"] = _celery_version()
    report["storage_text"] = (
        f"MySQL ({redacted(args.mysql_url)})" if args.mysql_url else "SQLite (temp file, WAL)"
    )
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        print(f"\nfigures written to {args.json}")
    print(f"daemon logs and raw profiles: {out_dir}")
    return 0


def print_report(report: dict[str, Any]) -> None:
    args = report["args"]
    machine = report["machine"]
    print(
        f"\nAys end-to-end: fire -> run -> result stored. {report['storage_text']}, built-in "
        f"registry and transport, node max_concurrent_jobs {args['concurrency']}, every task "
        f"`{EVERY_SECOND}`, round_robin; window {args['seconds']} s per step after "
        f"{args['warmup']:g} s warm-up."
    )
    print(
        f"Python {machine['python']}, {machine['cpus']} CPUs; before: {machine['load_before']}; "
        f"after: {machine['load_after']}; run took {report['elapsed_s']:.0f} s."
    )
    print(
        "Latencies in ms from the slot (intended) time, p50/p99 over the window's succeeded "
        "runs: claim = job-log row claimed (Celery: beat published), start = job started on "
        "the node (Celery: task body started), stored = result stored. CPU: % of one core "
        "during the window (a node or worker includes the jobs it ran; machine = all CPUs)."
    )
    all_ays = [s for phase in report["ays"] for s in phase["steps"]]
    if all_ays:
        if any(s["stored_is"] == "ended" for s in all_ays):
            print("NOTE: no result-stored trigger: `stored` is the node-reported ended_at.")
        print_steps("Ays", all_ays, ("manager", "nodes", "machine"))
        print_failures(all_ays)
    if report["celery"]:
        print_steps(
            f"Celery {report['celery_version']} (beat + 1 prefork worker, concurrency "
            f"{args['concurrency']}, Redis broker + result backend)",
            report["celery"],
            ("beat", "worker", "machine"),
        )
        print_failures(report["celery"])
        schedule = celery_schedule(report["celery"])
        print(
            f"  ({schedule} schedule; fired = messages beat sent for the window: "
            + (
                "a slot beat reaches after its second has passed is skipped)"
                if schedule == "aligned"
                else "its interval schedule counts each entry's next send from its actual "
                "send, so late sends lower the rate below N and the intended times drift)"
            )
        )
        for phase in report["ays"]:
            print_side_by_side(phase, report["celery"])
    print(
        "\nHighest N kept up with (see `keeps up` in bench/e2e_bench.py's docstring), and the "
        "highest N at which every fire of the window ran and succeeded (within the drain):"
    )
    rows = [(f"Ays {p['kind']:<5} {p['nodes']} node(s)", p["steps"]) for p in report["ays"]]
    if report["celery"]:
        rows.append(("Celery shell 1 worker ", report["celery"]))
    for name, steps in rows:
        tried = [s["n"] for s in steps]
        print(
            f"  {name}: kept up {best(steps)}; every fire succeeded {best_complete(steps)} "
            f"(steps tried: {tried})"
        )
    for phase in report["ays"]:
        if phase["profile"]:
            print_profile(phase)


def _celery_version() -> str:
    try:
        import celery

        return celery.__version__
    except ImportError:  # pragma: no cover - the bench extra is missing
        return "?"


if __name__ == "__main__":
    sys.exit(main())
