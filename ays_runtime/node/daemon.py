"""The node daemon (built-in registry and transport): serves the node API, runs the jobs it
is handed, reports their results, and beats to the manager.

Phases, as in gunicorn's arbiter and uvicorn's server:

    startup      listen on node.ip:node.port (or the socket given), load the result spool,
                 end the jobs an earlier process left running (the run journal, see
                 `journal`) and spool their results, start the HTTP server, the heartbeats
                 and the result retries
    main loop    wait for a stop request (a signal handler only records it)
    shutdown     time-boxed: say the node is leaving (built-in registry: a beat with state
                 leaving, and the managers route no new run here; jobs still arriving for
                 LEAVE_GRACE seconds, sent before every manager knew, are taken), stop
                 accepting jobs (503), let the held runs end for up to `drain_timeout`
                 seconds (a second stop request cuts this short), kill what is left, report
                 results (what no manager takes stays in the spool for the next start), stop
                 beating with a last beat saying offline (Consul: deregister the service),
                 close the server

Reload (ays_runtime/service/runner.py): `ready` is set once the node serves. Once the new
process is ready, `hand_over()` makes this one let go of the listening socket first (no
connection reset; a job that still arrives on a connection it already holds is taken), then
shut down as above, except that it does not leave the registry: the new process is the same
node. Running jobs get the drain time and their results are reported, while the new process
already takes the new jobs.

One run = one job-log id. The node runs an id at most once: an id it holds, has finished
(the last FINISHED_MEMORY of them) or still has in the spool is answered duplicate=true. And
no two nodes run one id: a run starts only once the manager has recorded that this node runs
it (the start claim, node/claims.py); a copy another node has claimed is dropped unrun.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import httpx
import uvicorn

from ays_runtime import __version__
from ays_runtime.auth import resolve_cluster_secret
from ays_runtime.config import EnvConfig
from ays_runtime.exceptions import ConfigError
from ays_runtime.metrics import node as node_metrics
from ays_runtime.metrics.node import NodeState
from ays_runtime.node.app import JobRefused, create_app
from ays_runtime.node.blocking import Admission, BlockGate, parse_strategy
from ays_runtime.node.claims import Claim, StartClaims
from ays_runtime.node.executor import Executor, JobResult, JobSpec
from ays_runtime.node.journal import RUNNING_DIR, JournalEntry, Reaped, RunJournal
from ays_runtime.node.load import host_load
from ays_runtime.node.managers import ManagerPool
from ays_runtime.node.membership import Membership, NodeMembership, http_host
from ays_runtime.node.spool import (
    RESULTS_DIR,
    HttpResultSink,
    ResultReporter,
    ResultSpool,
    SpooledResult,
)
from ays_runtime.protocol import (
    Heartbeat,
    JobResultReport,
    NodeHealth,
    Registration,
    RunAccepted,
    RunRequest,
)
from ays_runtime.service.handover import ConnectionCloser, release_listener
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.group_commit import GroupCommit
from ays_runtime.storage.models import RunStatus, TaskType
from ays_runtime.transport.base import JobSource, ResultSink
from ays_runtime.web.keepalive import SERVER_KEEP_ALIVE_S, client_limits

log = logging.getLogger("ays.node")

EXIT_OK = 0
# Long enough for the usual short job to end on its own; the service manager's stop timeout
# (systemd's TimeoutStopSec, 90 s by default) must be longer than this plus KILL_WAIT.
DRAIN_TIMEOUT = 30.0
# After the drain: how long killed runs may take to end (the executor's kill grace, then
# SIGKILL and its wait, fit in this for any sane kill_grace).
KILL_WAIT = 15.0
FLUSH_TIMEOUT = 5.0  # the last try to hand kept results to the manager before exiting
# After a leaving beat, jobs are still taken this long: every manager drops the node from
# its routing within a second of the beat (registry/builtin.py, REFRESH_INTERVAL), and a job
# it sent just before must not be refused.
LEAVE_GRACE = 2.0
SERVER_STOP_TIMEOUT = 5.0  # open API connections get this long to finish
STARTUP_TIMEOUT = 10.0
# Finished ids remembered for duplicate detection (a redelivery comes within minutes; this
# is hours of a busy node's runs, for well under a megabyte).
FINISHED_MEMORY = 10_000


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the daemon handles signals itself."""

    def capture_signals(self) -> contextlib.nullcontext[None]:  # type: ignore[override]
        return contextlib.nullcontext()


class NodeDaemon:
    """One node process. `serve()` runs it until `request_stop()`; see the module docstring."""

    def __init__(
        self,
        config: EnvConfig,
        sock: socket.socket | None = None,
        *,
        drain_timeout: float = DRAIN_TIMEOUT,
    ) -> None:
        if not config.node.group:
            raise ConfigError(
                "node.group is not set: give the node group with -g GROUP "
                "(e.g. -g node_group_ksa), or set node.group in the config"
            )
        self.config = config
        self.group: str = config.node.group
        self.address = f"{http_host(config.node.ip)}:{config.node.port}"
        self.who = f"node {self.address}"
        # Managers and this node present the cluster secret to each other; nothing else opens
        # the node (an operator's token, personal or shared, runs nothing here).
        self.token = resolve_cluster_secret(config, generate=False)
        self.drain_timeout = drain_timeout
        self._sock = sock
        self._spool = ResultSpool(Path(config.node.data_dir) / RESULTS_DIR, self.who)
        self._journal = RunJournal(Path(config.node.data_dir) / RUNNING_DIR, self.who)
        self._journaled: set[int] = set()
        # Runs spawning or ending together are journaled in one worker-thread call each way.
        self._journal_writes = GroupCommit(self._journal.record_many)
        self._journal_removes = GroupCommit(self._journal.remove_many)
        self._report_to: dict[int, str] = {}  # held runs: where their results go
        self._executor = Executor.from_config(config, speaker=self.who, on_spawn=self._spawned)
        self._gate = BlockGate()
        self._held: set[int] = set()  # accepted, not finished
        self._finished: OrderedDict[int, None] = OrderedDict()
        self._runs: set[asyncio.Task[None]] = set()
        self._reporter: ResultReporter | None = None
        self._claims: StartClaims | None = None
        self._membership: NodeMembership | None = None
        self._source: JobSource | None = None  # besides the API (RocketMQ: the group's topic)
        self._stopping = False
        self._leaving = False  # stopping cleanly: the beats say so
        self._gone = False  # the last beat is due
        self._managers = ManagerPool.for_config(config, self.who)
        # Stop requests: recorded by signal handlers, acted on by serve().
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._stop_reasons: list[str] = []
        self.ready = asyncio.Event()  # the node serves
        self._handing_over = False
        self._closer: ConnectionCloser | None = None
        self._started_at = time.monotonic()

    # --- the API's side ------------------------------------------------------------------------

    def accept(self, request: RunRequest) -> RunAccepted:
        """Take a run (202), or say it is a duplicate; raise JobRefused when the node will not
        take it now. Never waits: the run goes on in the background."""
        job_log_id = request.job_log_id
        if self._knows(job_log_id):
            log.info("%s: run %d is already here: not run again", self.who, job_log_id)
            return RunAccepted(job_log_id=job_log_id, duplicate=True)
        if self._stopping:
            raise JobRefused(503, f"{self.who} is stopping: it takes no new jobs")
        try:
            strategy = parse_strategy(request.block_strategy)
        except ValueError as err:
            raise JobRefused(422, f"block_strategy: {err}") from None
        report_to = urlsplit(request.report_to)
        if report_to.scheme not in {"http", "https"} or not report_to.hostname:
            raise JobRefused(
                422,
                f"report_to: {request.report_to!r} is not the manager's base URL "
                "(e.g. http://10.0.0.1:18080)",
            )
        if not request.queue_if_busy and self._full():
            raise JobRefused(
                429,
                f"{self.who} is full: {self._executor.running} of "
                f"{self._executor.max_concurrent} jobs running, "
                f"{self._executor.waiting} waiting",
            )
        admission = self._gate.enter(request.task_id, job_log_id, strategy)
        self._held.add(job_log_id)
        self._report_to[job_log_id] = request.report_to
        log.debug(
            "%s: run %d (task %d, %s) accepted",
            self.who,
            job_log_id,
            request.task_id,
            strategy.value,
        )
        task = asyncio.create_task(self._run(request, admission), name=f"ays-run-{job_log_id}")
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)
        return RunAccepted(job_log_id=job_log_id)

    async def kill(self, job_log_id: int, reason: str) -> bool:
        """End a held run (waiting or running); True when it ended as killed."""
        if self._gate.stop_waiting(job_log_id, reason):
            log.info("%s: run %d killed before it started: %s", self.who, job_log_id, reason)
            return True
        return await self._executor.kill(job_log_id, reason)

    def output(self, job_log_id: int) -> bytes | None:
        output = self._executor.output(job_log_id)
        if output is None and job_log_id in self._gate:
            return b""  # held, not started yet
        return output

    def output_from(self, job_log_id: int, position: int) -> tuple[bytes, int, str] | None:
        """A run's output from stream position `position` on: (bytes, the position to ask for
        next, "waiting" | "running" | "finished"); None when the run is unknown here or its
        output is no longer kept."""
        chunk = self._executor.output_from(job_log_id, position)
        if chunk is None:
            return (b"", 0, "waiting") if job_log_id in self._gate else None
        if job_log_id not in self._held:
            state = "finished"
        else:
            state = "running" if self._executor.is_running(job_log_id) else "waiting"
        return chunk[0], chunk[1], state

    def health(self) -> NodeHealth:
        registration = None
        if self._membership is not None:
            registration = Registration(**dataclasses.asdict(self._membership.status()))
        return NodeHealth(
            address=self.address,
            node_group=self.group,
            version=__version__,
            running_jobs=self._executor.running,
            draining=self._stopping,
            uptime_s=round(time.monotonic() - self._started_at, 3),
            registration=registration,
        )

    def metrics_state(self) -> NodeState:
        """What GET /metrics reads at scrape time (ays_runtime/metrics/node.py)."""
        executor, held = self._executor, self._held
        return NodeState(
            group=self.group,
            running=lambda: executor.running,
            waiting=lambda: max(len(held) - executor.running, 0),
            slots=lambda: executor.max_concurrent,
            spooled=lambda: self._reporter.pending if self._reporter is not None else 0,
        )

    def heartbeat(self) -> Heartbeat:
        load = host_load()
        return Heartbeat(
            ip=self.config.node.ip,
            port=self.config.node.port,
            node_group=self.group,
            version=__version__,
            running_jobs=self._executor.running,
            max_concurrent_jobs=self._executor.max_concurrent,
            state=self._beat_state(),
            load_1m=load.load_1m,
            cpu_count=load.cpu_count,
            memory_percent=load.memory_percent,
        )

    def _beat_state(self) -> Literal["online", "leaving", "offline"]:
        if not self._leaving:
            return "online"
        if not self._gone or self._runs or (self._reporter and self._reporter.pending):
            return "leaving"  # runs or results still to come: not gone yet
        return "offline"

    # --- runs -----------------------------------------------------------------------------

    @property
    def reporter(self) -> ResultReporter:
        assert self._reporter is not None, "serve() first"
        return self._reporter

    @property
    def stopping(self) -> bool:
        return self._stopping

    def holds(self, job_log_id: int) -> bool:
        """Whether run `job_log_id` is accepted here and not finished."""
        return job_log_id in self._held

    def knows(self, job_log_id: int) -> bool:
        """Whether run `job_log_id` is held, finished lately or still in the spool here."""
        return self._knows(job_log_id)

    def _transport(self, client: httpx.AsyncClient) -> tuple[ResultSink, JobSource | None]:
        """The result sink and extra job source of the env's transport (imported lazily)."""
        if self.config.transport.backend == "rocketmq":
            from ays_runtime.node.rocketmq import RocketMQNodeTransport

            mq = RocketMQNodeTransport(self.config, self.group, self.address, client, self.token)
            return mq, mq
        return HttpResultSink(client, self.token, self._managers), None

    def _knows(self, job_log_id: int) -> bool:
        return (
            job_log_id in self._held
            or job_log_id in self._finished
            or (self._reporter is not None and job_log_id in self._reporter)
        )

    def _full(self) -> bool:
        executor = self._executor
        return executor.running + executor.waiting >= executor.max_concurrent

    async def _run(self, request: RunRequest, admission: Admission) -> None:
        result: JobResult | None
        try:
            if admission.hold is None:
                log.info(
                    "%s: run %d (task %d) discarded: %s",
                    self.who,
                    request.job_log_id,
                    request.task_id,
                    admission.discarded,
                )
                result = _not_run(request, RunStatus.DISCARDED, admission.discarded)
            else:
                result = await self._run_held(request, admission)
        except Exception as err:  # a bug here must still end the run with a result
            log.exception("%s: run %d: node error", self.who, request.job_log_id)
            result = _not_run(request, RunStatus.FAILED, f"node error: {type(err).__name__}")
        if result is None:
            await self._drop(request)
        else:
            await self._finish(request, result)

    async def _run_held(self, request: RunRequest, admission: Admission) -> JobResult | None:
        """Wait the run's turn, claim its start (node/claims.py), run it; None when another
        node holds it (or it has ended): then it is not run and nothing is reported."""
        hold = admission.hold
        assert hold is not None
        try:
            if admission.cover:
                reason = f"covered by run {request.job_log_id}"
                log.info(
                    "%s: run %d (task %d) covers run(s) %s",
                    self.who,
                    request.job_log_id,
                    request.task_id,
                    ", ".join(map(str, admission.cover)),
                )
                await asyncio.gather(*(self._executor.kill(i, reason) for i in admission.cover))
            stopped = await self._gate.wait_turn(hold)
            if stopped:
                return _not_run(request, RunStatus.KILLED, stopped)
            assert self._claims is not None, "serve() first"
            outcome = await self._claims.claim(request.job_log_id, request.report_to)
            if outcome.claim is Claim.TAKEN:
                log.info(
                    "%s: run %d not run here: %s", self.who, request.job_log_id, outcome.detail
                )
                return None
            if outcome.claim is Claim.UNANSWERED:
                log.warning("%s: run %d %s", self.who, request.job_log_id, outcome.detail)
                return _not_run(request, RunStatus.FAILED, outcome.detail)
            spec = _spec(request)
            if spec.task_type == TaskType.SHELL.value:
                await self._journal_ahead(spec)
            return await self._executor.run(spec)
        finally:
            self._gate.leave(hold)

    def _forget(self, job_log_id: int) -> None:
        """Run `job_log_id` is no longer held; remembered as finished (a copy is not run)."""
        self._finished[job_log_id] = None
        while len(self._finished) > FINISHED_MEMORY:
            self._finished.popitem(last=False)
        self._held.discard(job_log_id)

    async def _drop(self, request: RunRequest) -> None:
        """A copy of a run that another node holds: not run, nothing reported; its source
        settles it (RocketMQ acks the message)."""
        self._forget(request.job_log_id)
        if self._source is not None:
            await self._source.dropped(request.job_log_id)

    async def _finish(self, request: RunRequest, result: JobResult) -> None:
        job_log_id = request.job_log_id
        self._forget(job_log_id)
        node_metrics.RUNS_FINISHED.labels(result.status).inc()
        report = JobResultReport(
            job_log_id=job_log_id,
            node=self.address,
            status=result.status,
            exit_code=result.exit_code,
            started_at=result.started_at,
            ended_at=result.ended_at,
            output=result.output_excerpt,
            output_truncated=result.output_truncated,
            message=result.message,
            result=result.result,
        )
        assert self._reporter is not None
        await self._reporter.report(SpooledResult(request.report_to, report))
        self._report_to.pop(job_log_id, None)
        if job_log_id in self._journaled:  # the spool speaks for the run now
            self._journaled.discard(job_log_id)
            await self._journal_removes.submit(job_log_id)

    async def _journal_ahead(self, spec: JobSpec) -> None:
        """Journal a shell run as soon as its start is claimed, before it waits for a slot:
        the write, one directory fsync for the runs claimed together, is then off the time
        the run holds its slot. A node that dies before the spawn leaves an entry whose run
        is reported failed at the next start, as one that dies after it does."""
        try:
            await self._spawned(spec, None)
        except OSError as err:  # the run goes on; the executor journals it ahead once more
            log.error(
                "%s: run %d: cannot journal it ahead of its start: %s",
                self.who,
                spec.job_id,
                err.strerror or err,
            )

    async def _spawned(self, spec: JobSpec, pid: int | None) -> None:
        """Journal a shell job ahead of its spawn (pid None; once: a run journaled when its
        start was claimed is not written again), then its process group as soon as its shell
        is spawned."""
        if pid is None and spec.job_id in self._journaled:
            return
        report_to, started_at = self._report_to.get(spec.job_id, ""), utcnow().isoformat()
        if pid is None:
            entry: JournalEntry | None = JournalEntry.ahead(
                spec.job_id, spec.task_id, report_to, started_at
            )
        else:
            entry = JournalEntry.of(spec.job_id, spec.task_id, pid, report_to, started_at)
        if entry is not None:
            await self._journal_writes.submit(entry)
            self._journaled.add(spec.job_id)

    async def _reap_journal(self, spooled: list[SpooledResult]) -> list[SpooledResult]:
        """End the jobs an earlier process of this node left running, and spool a failed
        result for each journaled run the spool has none of (see `journal`)."""
        entries = await asyncio.to_thread(self._journal.load)
        if not entries:
            return []
        reaped = await asyncio.to_thread(self._journal.reap, entries, self.config.node.kill_grace)
        have = {entry.job_log_id for entry in spooled}
        results = [
            _reaped_result(self.address, r) for r in reaped if r.entry.job_log_id not in have
        ]
        results = [r for r in results if r.report_to]
        if results:
            await asyncio.to_thread(self._spool.put_many, results)
        for entry in entries:
            await asyncio.to_thread(self._journal.remove, entry.job_log_id)
        return results

    # --- lifecycle --------------------------------------------------------------------------

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask `serve()` to shut down; a second request skips the rest of the drain.
        Only records the request: safe from a signal handler and from any thread."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            self._record_stop(reason)
        elif not loop.is_closed():  # closed: serve() has already returned
            loop.call_soon_threadsafe(self._record_stop, reason)

    def hand_over(self) -> None:
        """Stop after a reload: release the socket without a reset, then shut down."""
        self._handing_over = True
        self.request_stop("handed over to a new process")

    def _record_stop(self, reason: str) -> None:
        self._stop_reasons.append(reason)
        if self._stop.is_set():
            self._hurry.set()
        self._stop.set()

    async def serve(self) -> None:
        """Run the node until a stop request, then shut down (time-boxed)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        spooled = await asyncio.to_thread(self._spool.load)
        spooled += await self._reap_journal(spooled)
        sock = self._sock if self._sock is not None else self._listen()
        for entry in spooled:
            self._finished[entry.job_log_id] = None
        # Heartbeats get their own client: a backlog of result posts must never hold a
        # heartbeat back long enough for the manager to call a healthy node lost.
        limits = client_limits()
        async with (
            httpx.AsyncClient(limits=limits) as client,
            httpx.AsyncClient(limits=limits) as beat_client,
        ):
            sink, self._source = self._transport(client)
            self._reporter = ResultReporter(self._spool, sink, self.who)
            self._claims = StartClaims(
                client,
                self.token,
                self.address,
                self.who,
                self.config.node.start_claim_wait,
                self._managers,
            )
            self._reporter.adopt(spooled)
            membership = self._membership = Membership.for_config(
                self.config,
                self.who,
                self._managers,
                beat_client,
                self.token,
                self.heartbeat,
                on_return=self._reporter.retry_now,
            )
            self._closer = ConnectionCloser(create_app(self))
            server = _Server(
                uvicorn.Config(
                    self._closer,
                    lifespan="off",
                    ws="none",
                    log_config=None,
                    access_log=False,
                    server_header=False,
                    timeout_graceful_shutdown=int(SERVER_STOP_TIMEOUT),
                    timeout_keep_alive=SERVER_KEEP_ALIVE_S,
                )
            )
            server_task = asyncio.create_task(server.serve(sockets=[sock]), name="ays-node-api")
            background = [asyncio.create_task(self._reporter.run(), name="ays-node-results")]
            try:
                await self._started(server, server_task)
                background.append(asyncio.create_task(membership.run(), name="ays-node-hb"))
                if self._source is not None:
                    await self._source.start(self)
                log.info(
                    "%s: serving node group %s (up to %d jobs at once, results spooled in %s)",
                    self.who,
                    self.group,
                    self._executor.max_concurrent,
                    self._spool.directory,
                )
                self.ready.set()
                stop = asyncio.create_task(self._stop.wait())
                await asyncio.wait({stop, server_task}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if server_task.done():
                    log.error("%s: the API server stopped on its own: shutting down", self.who)
                else:
                    log.info("%s: %s: shutting down", self.who, self._stop_reasons[0])
            finally:
                await self._shutdown(server, server_task, background)
        error = None if server_task.cancelled() else server_task.exception()
        if error is not None:
            raise error

    def _listen(self) -> socket.socket:
        ip, port = self.config.node.ip, self.config.node.port
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            return socket.create_server((ip, port), family=family, backlog=1024)
        except OSError as err:
            raise ConfigError(
                f"{self.who}: cannot listen on {self.address}: {_reason(err)}; another "
                f"process may hold port {port}: choose another with -P PORT (node.port), or "
                f"an address of this host with -p IP (node.ip)"
            ) from None

    async def _started(self, server: uvicorn.Server, server_task: asyncio.Task[None]) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not server.started:
            if server_task.done():
                server_task.result()  # raises what stopped it
                raise RuntimeError(f"{self.who}: the API server ended before it started")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.who}: the API server did not start in time")
            await asyncio.sleep(0.01)

    async def _shutdown(
        self,
        server: uvicorn.Server,
        server_task: asyncio.Task[None],
        background: list[asyncio.Task[None]],
    ) -> None:
        if self._handing_over and self._closer is not None and server.started:
            await release_listener(server, self._closer)
        elif self._membership is not None:
            await self._say_leaving(self._membership)
        self._stopping = True
        if self._source is not None:
            await self._source.stop()
        await self._drain()
        if self._reporter is not None:
            left = await self._reporter.flush(FLUSH_TIMEOUT)
            if left:
                log.warning(
                    "%s: %d result(s) not taken by the manager stay in %s; the next start "
                    "sends them",
                    self.who,
                    left,
                    self._spool.directory,
                )
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if self._source is not None:
            await self._source.close()
        await self._executor.aclose()
        if self._membership is not None and not self._handing_over:
            self._gone = True
            await self._membership.leave()
        server.should_exit = True
        await asyncio.wait({server_task}, timeout=SERVER_STOP_TIMEOUT + 2)
        if not server_task.done():
            server.force_exit = True
            server_task.cancel()
            await asyncio.wait({server_task})
        log.info("%s: stopped", self.who)

    async def _say_leaving(self, membership: NodeMembership) -> None:
        """Tell the registry the node takes no new runs; then take the jobs still arriving
        for LEAVE_GRACE seconds (a second stop request cuts this short)."""
        self._leaving = True
        if not await membership.leaving():
            return
        log.info(
            "%s: leaving: the managers route no new runs here; %d run(s) held",
            self.who,
            len(self._runs),
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), LEAVE_GRACE)

    async def _drain(self) -> None:
        """Let the held runs end for up to drain_timeout; then kill the rest."""
        if self._runs:
            log.info(
                "%s: waiting up to %gs for %d run(s) to end and be reported "
                "(stop again to kill them now)",
                self.who,
                self.drain_timeout,
                len(self._runs),
            )
        deadline = time.monotonic() + self.drain_timeout
        hurry = asyncio.create_task(self._hurry.wait())
        try:
            while self._runs and not self._hurry.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await asyncio.wait(
                    {*self._runs, hurry}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            hurry.cancel()
        if not self._runs:
            return
        why = "a second stop request" if self._hurry.is_set() else f"{self.drain_timeout:g}s drain"
        reason = f"node stopping ({why})"
        log.warning("%s: %s: killing %d run(s) still held", self.who, why, len(self._runs))
        self._gate.stop_all_waiting(reason)
        await self._executor.kill_all(reason)
        await asyncio.wait(set(self._runs), timeout=KILL_WAIT)
        if self._runs:
            log.error(
                "%s: %d run(s) did not end %gs after the kill; leaving without their results",
                self.who,
                len(self._runs),
                KILL_WAIT,
            )


def _reason(err: OSError) -> str:
    return os.strerror(err.errno) if err.errno else str(err)


def _spec(request: RunRequest) -> JobSpec:
    return JobSpec(
        job_id=request.job_log_id,
        task_id=request.task_id,
        task_type=request.task_type,
        payload=request.payload,
        timeout_s=request.timeout_s,
        params=request.params,
        shard_index=request.shard_index,
        shard_total=request.shard_total,
        attempt=request.attempt,
        scheduled_at=_naive_utc(request.scheduled_at).isoformat(),
        parent_results=request.parent_results,
    )


def _naive_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def _not_run(request: RunRequest, status: RunStatus, message: str) -> JobResult:
    """The result of a run that never started."""
    return JobResult(
        job_id=request.job_log_id,
        status=status.value,
        exit_code=None,
        started_at=None,
        ended_at=utcnow(),
        output_excerpt="",
        output_truncated=False,
        message=message,
    )


def _reaped_result(address: str, reaped: Reaped) -> SpooledResult:
    """The result of a run an earlier process of the node left behind: failed, whatever it
    would have done (its processes are gone now, so a retry runs alone)."""
    entry = reaped.entry
    if reaped.survivors:
        message = (
            f"node restarted: job killed ({reaped.survivors} process(es) outlived the node's "
            f"last process; ended with {reaped.how})"
        )
    else:
        message = (
            "node restarted: the job ended with the node's last process (or had not started "
            "yet); its result was lost"
        )
    report = JobResultReport(
        job_log_id=entry.job_log_id,
        node=address,
        status=RunStatus.FAILED.value,
        started_at=datetime.fromisoformat(entry.started_at) if entry.started_at else None,
        ended_at=utcnow(),
        message=message,
    )
    return SpooledResult(entry.report_to, report)


def _watch_children_with_pidfds() -> None:
    """Have asyncio learn that a job's process exited from a pidfd on the event loop, as
    Python 3.12 and later do by default, instead of Python 3.11's thread per child process
    (ThreadedChildWatcher: a thread started, and handing the GIL back and forth, for every
    shell job). Left as it is where pidfds are missing (Linux before 5.3, other systems)."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return
    asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


def run_node(config: EnvConfig) -> int:
    """Run a node in the foreground until SIGINT or SIGTERM (a second one kills the held runs
    at once); return the exit code."""
    daemon = NodeDaemon(config)
    _watch_children_with_pidfds()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handled = (signal.SIGINT, signal.SIGTERM)
        for sig in handled:
            loop.add_signal_handler(sig, daemon.request_stop, f"{sig.name} received")
        try:
            await daemon.serve()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    asyncio.run(main())
    return EXIT_OK
