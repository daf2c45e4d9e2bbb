"""The manager daemon: startup, main loop, time-boxed shutdown.

Startup: migrate the schema, resolve the access token, bind the listening socket (a clear
error if the address is taken), pick the registry and transport the env file names (the
dispatcher, manager/dispatch.py, drives the transport), start the API, the scheduler, the
registry, the reaper and the retention purge.
Shutdown (SIGINT/SIGTERM record the request; `serve` acts on it): stop firing, flush the
claim writer (no slot half-fired), finish deliveries in flight, stop the API, close.

Reload (ays_runtime/service/runner.py): `ready` is set once the API serves and the first
reconcile has installed the timers. The new manager fires from then on, while the old one
still fires until it has let go of the socket: both claim the same slots, and the slot key
lets exactly one claim win, so no fire is lost or doubled. The new manager re-dispatches
claimed-but-pending runs only once the old one has exited (`predecessor_gone`): until then
they may be the old one's deliveries in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import uvicorn
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime import __version__
from ays_runtime.alerts.api import alerts_router
from ays_runtime.alerts.service import AlertService
from ays_runtime.auth import resolve_access_token, resolve_cluster_secret
from ays_runtime.config import EnvConfig
from ays_runtime.exceptions import ConfigError
from ays_runtime.manager import overview
from ays_runtime.manager.api import create_app
from ays_runtime.manager.context import ManagerContext
from ays_runtime.manager.dispatch import Dispatcher
from ays_runtime.manager.forecast import keep_warm
from ays_runtime.manager.kills import RunKiller
from ays_runtime.manager.liveness import adopt_from_silent
from ays_runtime.manager.node_api import node_router
from ays_runtime.manager.output import RunOutput
from ays_runtime.manager.retention import (
    AUDIT_ENTRIES,
    SIGN_IN_LIMITS,
    WITH_JOB_LOGS,
    retention_loop,
)
from ays_runtime.manager.runs import RunTracker
from ays_runtime.metrics import manager as metrics
from ays_runtime.registry.base import NodeRegistry
from ays_runtime.scheduler.ownership import BUCKETS, Ownership
from ays_runtime.scheduler.scheduler import Scheduler
from ays_runtime.service.handover import ConnectionCloser, release_listener
from ays_runtime.storage.database import make_engine, redacted, session_factory
from ays_runtime.storage.migrate import upgrade
from ays_runtime.transport.base import JobDispatch, Transport
from ays_runtime.users import service as users
from ays_runtime.web.keepalive import SERVER_KEEP_ALIVE_S
from ays_runtime.workflows.service import WorkflowService

log = logging.getLogger("ays.manager")

SHUTDOWN_TIMEOUT = 15.0
REAP_INTERVAL = 5.0


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns the signals."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()


def listen(ip: str, port: int) -> socket.socket:
    """Bind the listening socket, or fail with a message naming the address."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only then (else ~40 ms delayed ACKs).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((ip, port))
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"cannot listen on {ip}:{port}: {err.strerror}; choose another -p/-P or stop "
            "what holds it"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Manager:
    def __init__(
        self,
        config: EnvConfig,
        sock: socket.socket | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self.manager_id = f"{config.manager.ip}:{config.manager.port}"
        self._sock = sock
        self._injected_transport = transport
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()  # the API serves and the timers are installed
        # Set for a reload's new manager: returns once the old manager has exited.
        self.predecessor_gone: Callable[[], Awaitable[None]] | None = None
        self._handing_over = False
        self._recovered = asyncio.Event()  # this manager's own pending runs are re-sent

    def request_stop(self, reason: str = "stop requested") -> None:
        self._stop.set()

    def hand_over(self) -> None:
        """Stop after a reload: release the socket without a reset, then shut down."""
        self._handing_over = True
        self._stop.set()

    async def serve(self) -> None:
        cfg = self.config
        url = cfg.storage_url()
        await asyncio.to_thread(upgrade, url)
        token = resolve_access_token(cfg, generate=True)
        # What this manager presents to nodes, and takes from them (never the access token).
        cluster = resolve_cluster_secret(cfg, generate=True)
        sock = self._sock or listen(cfg.manager.ip, cfg.manager.port)
        engine = make_engine(url, cfg.storage.pool_size)
        sessions = session_factory(engine)
        if cfg.is_dev:
            admin = await asyncio.to_thread(_bootstrap_admin, sessions, cfg)
            if admin is not None:
                log.info(
                    "manager %s: created the dev admin user 'admin'; its password is in %s "
                    "(mode 0600)",
                    self.manager_id,
                    admin,
                )

        # The tracker re-dispatches retries through the dispatcher, made just after it.
        dispatcher_box: list[Dispatcher] = []

        async def dispatch(jobs: list[JobDispatch]) -> None:
            await dispatcher_box[0].dispatch(jobs)

        tracker = RunTracker(engine, self.manager_id, cfg.job_log.excerpt_bytes, dispatch)
        registry = make_registry(cfg, engine, self.manager_id)
        registry.on_node_lost = tracker.node_lost
        transport = self._injected_transport or make_transport(
            cfg, cluster, f"http://{self.manager_id}", f"manager {self.manager_id}"
        )
        dispatcher = Dispatcher(registry, tracker, transport)
        dispatcher_box.append(dispatcher)
        ownership = Ownership(
            engine,
            self.manager_id,
            __version__,
            beat_interval=cfg.manager.beat_interval,
            silent_after=cfg.manager.silent_after,
            misfire_grace=cfg.manager.misfire_grace,
        )
        scheduler = Scheduler(
            engine,
            self.manager_id,
            on_claimed=dispatch,
            reconcile_interval=cfg.manager.reconcile_interval,
            misfire_grace=cfg.manager.misfire_grace,
            ledger_horizon=cfg.manager.ledger_horizon,
            ownership=ownership,
            claim_ahead=cfg.manager.claim_ahead,
        )
        self.scheduler = scheduler
        self.ownership = ownership
        self.engine = engine
        metrics.attach(
            metrics.ManagerState(
                engine, lambda: len(scheduler.timers), lambda: scheduler.writer.backlog
            ),
            transport=cfg.transport.backend,
            task_labels=cfg.metrics.task_labels,
            firing=cfg.metrics.firing,
        )
        killer = RunKiller(engine, registry, tracker, cluster)

        async def kill_run(job_log_id: int, reason: str) -> tuple[bool, str, str]:
            outcome = await killer.kill(job_log_id, reason)
            return outcome.killed, outcome.status, outcome.detail

        run_output = RunOutput(sessions, cluster)

        async def reconcile() -> list[str]:
            plan = await scheduler.reconcile_now()
            return [str(action) for action in plan.actions]

        workflows = WorkflowService(engine, self.manager_id, scheduler.writer.submit, kill_run)
        ctx = ManagerContext(
            config=cfg,
            sessions=sessions,
            access_token=token,
            cluster_secret=cluster,
            manager_id=self.manager_id,
            on_tasks_changed=_discard(scheduler.reconcile_now),
            trigger_now=scheduler.trigger_now,
            kill_run=kill_run,
            run_output=run_output,
            reconcile=reconcile,
            version=__version__,
            workflows=workflows,
        )
        app = create_app(ctx)
        alerts = AlertService(engine, cfg.alerts, cfg.env, self.manager_id)
        tracker.on_stored = alerts.runs_stored
        app.state.alerts = alerts  # the console's alerts page
        app.include_router(alerts_router(alerts))
        from ays_runtime.registry.builtin import BuiltinRegistry

        app.include_router(
            node_router(
                sessions,
                tracker,
                registry if isinstance(registry, BuiltinRegistry) else None,
                self.manager_id,
                node_list=None if isinstance(registry, BuiltinRegistry) else registry,
            )
        )
        if cfg.registry.backend == "consul":
            from ays_runtime.manager.registry_api import consul_watch_router

            app.include_router(consul_watch_router(registry, self.manager_id))  # type: ignore[arg-type]
        closer = ConnectionCloser(app)
        server = QuietServer(
            uvicorn.Config(
                closer,
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=5,
                timeout_keep_alive=SERVER_KEEP_ALIVE_S,
            )
        )
        log.info(
            "manager %s: env %s, database %s, registry %s, transport %s, version %s",
            self.manager_id,
            cfg.env,
            redacted(url),
            cfg.registry.backend,
            cfg.transport.backend,
            __version__,
        )

        await registry.start()
        await dispatcher.start()
        api = asyncio.create_task(server.serve(sockets=[sock]), name="api")
        sched = asyncio.create_task(scheduler.run(), name="scheduler")
        purge = asyncio.create_task(
            retention_loop(
                engine,
                {
                    **dict.fromkeys(WITH_JOB_LOGS, timedelta(days=cfg.job_log.retention_days)),
                    AUDIT_ENTRIES: timedelta(days=cfg.audit.retention_days),
                    SIGN_IN_LIMITS: timedelta(
                        seconds=max(cfg.console.sign_in.window, cfg.console.sign_in.lockout)
                    ),
                },
                cfg.job_log.purge_batch,
                self._stop,
            ),
            name="retention",
        )
        reaper = asyncio.create_task(self._reap(tracker), name="reaper")
        alerting = asyncio.create_task(alerts.run(), name="alerts")
        recovery = asyncio.create_task(self._recover(tracker), name="recover-pending")
        flows = asyncio.create_task(workflows.run(), name="workflows")
        while not self._up(server, scheduler) and not (
            api.done() or sched.done() or self._stop.is_set()
        ):
            await asyncio.sleep(0.01)
        if self._up(server, scheduler):
            self.ready.set()
            log.info("manager %s: serving", self.manager_id)
        # After the scheduler's first reconcile: the schedules are parsed (a shared cache).
        warming = asyncio.create_task(keep_warm(sessions, self._stop), name="forecast-warm")
        # The dashboard's day of minutes, read once here rather than by the first page load.
        dashboard = asyncio.create_task(
            overview.keep_warm(sessions, self._stop), name="overview-warm"
        )

        stop = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait({stop, api, sched}, return_when=asyncio.FIRST_COMPLETED)
        for crashed in done - {stop}:
            if crashed.exception() is not None:
                log.error(
                    "manager %s: %s stopped: %r",
                    self.manager_id,
                    crashed.get_name(),
                    crashed.exception(),
                )
        # -- time-boxed shutdown: firing first, then the API, then the rest.
        log.info("manager %s: stopping", self.manager_id)
        if self._handing_over:
            await release_listener(server, closer)
        self._stop.set()
        workflows.stop()
        scheduler.stop()
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(sched, SHUTDOWN_TIMEOUT)
        if not self._handing_over:  # a reload's successor carries this id on: no leaving
            try:
                await asyncio.to_thread(ownership.leave)
            except SQLAlchemyError as err:  # the peers find this one silent instead
                log.warning(
                    "manager %s: could not mark this manager stopped: %s", self.manager_id, err
                )
        server.should_exit = True
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(api, 10)
        await dispatcher.stop(5)
        await run_output.close()
        await tracker.stop()
        await registry.stop()
        for task in (purge, reaper, stop, recovery, alerting, warming, dashboard, flows):
            task.cancel()
        await asyncio.gather(
            purge,
            reaper,
            stop,
            recovery,
            alerting,
            warming,
            dashboard,
            flows,
            return_exceptions=True,
        )
        engine.dispose()
        sock.close()
        log.info("manager %s: stopped", self.manager_id)

    @staticmethod
    def _up(server: uvicorn.Server, scheduler: Scheduler) -> bool:
        return server.started and scheduler.ready.is_set()

    async def _recover(self, tracker: RunTracker) -> None:
        if self.predecessor_gone is not None:
            await self.predecessor_gone()
        try:
            await tracker.recover_pending()
        except Exception:  # the next start tries again; say so now, not at exit
            log.exception("manager %s: re-dispatching pending runs failed", self.manager_id)
        self._recovered.set()

    async def _reap(self, tracker: RunTracker) -> None:
        # The liveness beat itself is the scheduler's (scheduler/ownership.py).
        settings = self.config.manager
        # Every pending run after adopt_after; those claimed ahead once the tasks move.
        bounds = (
            (timedelta(seconds=settings.adopt_after), False),
            (timedelta(seconds=settings.silent_after), True),
        )
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                await tracker.reap_orphans()
            try:
                for silent_for, claimed_ahead in bounds:
                    if not self._recovered.is_set():  # own leftovers first, then a peer's
                        break
                    token = await asyncio.to_thread(
                        adopt_from_silent,
                        self.engine,
                        self.manager_id,
                        silent_for,
                        self.ownership.owned,
                        BUCKETS,
                        claimed_ahead,
                    )
                    if token is not None:
                        await tracker.recover_pending(claim=token)
            except SQLAlchemyError as err:  # the database is away: the next tick tries again
                log.debug("manager %s: liveness: %s", self.manager_id, err)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), REAP_INTERVAL)


def _discard(fn: Any) -> Any:
    async def call() -> None:
        await fn()

    return call


def make_registry(config: EnvConfig, engine: Any, manager_id: str) -> NodeRegistry:
    """The registry backend the env file names (imported lazily)."""
    backend = config.registry.backend
    if backend == "builtin":
        from ays_runtime.registry.builtin import BuiltinRegistry

        return BuiltinRegistry(engine, config.registry, manager_id)  # type: ignore[arg-type]
    if backend == "consul":
        try:
            from ays_runtime.registry.consul import ConsulRegistry
        except ImportError as err:
            raise ConfigError(
                f"env {config.env}: registry backend consul needs py-consul ({err}); "
                "install it with pip install 'ays[consul]'"
            ) from None
        return ConsulRegistry(engine, config.registry, manager_id)  # type: ignore[arg-type]
    raise ConfigError(
        f"env {config.env}: registry backend {backend!r} is not available in this version; "
        "use registry: {backend: builtin}"
    )


def _bootstrap_admin(sessions: sessionmaker[Session], cfg: EnvConfig) -> Path | None:
    with sessions() as session:
        return users.bootstrap_dev_admin(session, Path(cfg.manager.data_dir))


def make_transport(config: EnvConfig, token: str, report_to: str, who: str) -> Transport:
    """The transport backend the env file names (imported lazily)."""
    backend = config.transport.backend
    if backend == "builtin":
        from ays_runtime.transport.http import BuiltinTransport

        return BuiltinTransport(config.transport, token, report_to)  # type: ignore[arg-type]
    if backend == "rocketmq":
        from ays_runtime.transport.rocketmq import RocketMQTransport

        return RocketMQTransport(
            config.transport,  # type: ignore[arg-type]
            report_to,
            log_dir=config.manager.log_dir,
            who=who,
        )
    raise ConfigError(
        f"env {config.env}: transport backend {backend!r} is not available in this version; "
        "use transport: {backend: builtin}"
    )


def run_manager(config: EnvConfig) -> None:
    """Run the manager in the foreground until SIGINT or SIGTERM."""

    async def main() -> None:
        manager = Manager(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, manager.request_stop)
        await manager.serve()

    asyncio.run(main())
