"""The service process: one daemon (manager or node) with its signals, pidfile, readiness
notices and reloads. `aysManager serve` and `aysNode serve` run this; the systemd unit and
own supervision (`start`) both run `serve`.

Phases, as in gunicorn's arbiter:

    startup    take what a predecessor handed over (socket, ready pipe), or create the pidfile
               and bind the socket; start the daemon; once it serves, say READY (to systemd,
               and on the ready pipe to whoever started this process)
    main loop  the signal handlers only record a signal; the loop handles it:
                   SIGHUP          handle_hup: reload (handover.py), then leave
                   SIGTERM/SIGINT  handle_term: stop (a second one hurries a node's drain)
    shutdown   the daemon's own time-boxed shutdown; the pidfile goes if it is still ours

A reload's outcome is recorded in `<data_dir>/run/<service>.reload` (JSON, written
atomically, a sequence number per reload) for the `reload` command, which waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from ays_runtime import __version__
from ays_runtime.config import EnvConfig
from ays_runtime.exceptions import AysError, ServiceError
from ays_runtime.logs import FORMAT, configure_logging
from ays_runtime.service import systemd
from ays_runtime.service.handover import (
    READY_TIMEOUT,
    Inheritance,
    Successor,
    program_path,
    spawn_successor,
    stop_accepting,
)
from ays_runtime.service.layout import Role, ServiceFiles, service_umask
from ays_runtime.service.pidfile import Pidfile

log = logging.getLogger("ays.service")

EXIT_OK = 0
EXIT_FAILED = 1  # did not start, or the daemon failed; the reason is logged
STOP_WAIT = 120.0  # after a startup failure, the daemon's shutdown gets this long
LOG_FORMAT = FORMAT.replace("%(name)s", "%(name)s[%(process)d]")


class Daemon(Protocol):
    """What the runner needs of the manager and of the node."""

    ready: asyncio.Event  # set once it serves

    async def serve(self) -> None: ...

    def request_stop(self, reason: str = "stop requested") -> None: ...

    def hand_over(self) -> None:
        """Stop after a reload: let go of the listening socket without a reset (see
        handover.release_listener), then the usual shutdown."""


PredecessorGone = Callable[[], Awaitable[None]]
DaemonFactory = Callable[[socket.socket, PredecessorGone | None], Daemon]


@dataclass(frozen=True)
class ReloadRecord:
    seq: int
    old_pid: int
    new_pid: int | None
    ok: bool
    message: str
    at: float  # time.time()

    @classmethod
    def read(cls, path: Path) -> ReloadRecord | None:
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            return None  # half-read or foreign: the writer replaces it whole

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.fchmod(f.fileno(), 0o644)
                json.dump(asdict(self), f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


class ServiceRunner:
    def __init__(
        self,
        files: ServiceFiles,
        inheritance: Inheritance,
        make_daemon: DaemonFactory,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self.files = files
        self.inheritance = inheritance
        self.make_daemon = make_daemon
        self.ready_timeout = ready_timeout
        self.pidfile = Pidfile(files.pidfile)
        ip, port = files.address
        self.who = f"{files.service} {ip}:{port}"
        self._signals: list[signal.Signals] = []
        self._wakeup = asyncio.Event()
        self._sock: socket.socket | None = None
        self._daemon: Daemon | None = None
        self._successor: Successor | None = None  # its lifeline stays open until we exit
        self._stopping = False

    # --- signals: recorded here, handled by the main loop ----------------------------------

    def _record(self, sig: signal.Signals) -> None:
        self._signals.append(sig)
        self._wakeup.set()

    # --- phases ----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        handled = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
        for sig in handled:
            loop.add_signal_handler(sig, self._record, sig)
        try:
            serve = await self._startup()
            if serve is None:
                return EXIT_FAILED
            await self._main_loop(serve)
            return self._shutdown(serve)
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    async def _startup(self) -> asyncio.Task[None] | None:
        """Start the daemon; the serve task once it is ready, None when it did not start."""
        try:
            if not self.inheritance.successor:
                self.pidfile.create(os.getpid())
            ip, port = self.files.address
            self._sock = self.inheritance.adopt_socket(ip, port) or listen(ip, port, self.who)
            gone = self.inheritance.predecessor_gone if self.inheritance.successor else None
            self._daemon = self.make_daemon(self._sock, gone)
        except AysError as err:
            self._failed_to_start(str(err), None)
            return None
        daemon = self._daemon
        serve = asyncio.create_task(daemon.serve(), name=f"{self.files.service}-serve")
        ready = asyncio.create_task(daemon.ready.wait())
        deadline = time.monotonic() + self.ready_timeout
        while not ready.done():
            wake = asyncio.create_task(self._wakeup.wait())
            await asyncio.wait(
                {serve, ready, wake},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            wake.cancel()
            self._wakeup.clear()
            if serve.done() and not ready.done():
                ready.cancel()
                error = None if serve.cancelled() else serve.exception()
                why = str(error) if isinstance(error, AysError) else repr(error)
                if error is None:
                    why = "it stopped before it was ready"
                self._failed_to_start(why, serve)
                return None
            if any(s != signal.SIGHUP for s in self._signals):
                self._signals = [s for s in self._signals if s == signal.SIGHUP]
                self._stop("a stop signal came before it was ready")
            if time.monotonic() >= deadline and not ready.done():
                ready.cancel()
                self._stop("not ready in time")
                await asyncio.wait({serve}, timeout=STOP_WAIT)  # its own time-boxed shutdown
                self._failed_to_start(
                    f"not ready within {self.ready_timeout:g}s", serve, stopped=True
                )
                return None
        pid = os.getpid()
        ip, port = self.files.address
        log.info("%s: serving as pid %d, version %s", self.who, pid, __version__)
        self.inheritance.report_ready()
        if not self.inheritance.successor:  # a successor's predecessor tells systemd (MAINPID)
            systemd.notify("READY=1", f"STATUS=serving on {ip}:{port} (version {__version__})")
        return serve

    def _failed_to_start(
        self, why: str, serve: asyncio.Task[None] | None, stopped: bool = False
    ) -> None:
        log.error("%s: cannot start: %s", self.who, why)
        self.inheritance.report_failure(why)
        if not self.inheritance.successor:
            self.pidfile.remove_if_mine(os.getpid())
        if serve is not None and not serve.done() and not stopped:
            serve.cancel()
        return None

    async def _main_loop(self, serve: asyncio.Task[None]) -> None:
        while not serve.done():
            wake = asyncio.create_task(self._wakeup.wait())
            await asyncio.wait({serve, wake}, return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            self._wakeup.clear()
            while self._signals and not serve.done():
                sig = self._signals.pop(0)
                if sig == signal.SIGHUP:
                    await self.handle_hup()
                else:
                    self.handle_term(sig)

    def _shutdown(self, serve: asyncio.Task[None]) -> int:
        self.pidfile.remove_if_mine(os.getpid())
        error = None if serve.cancelled() else serve.exception()
        if error is not None:
            log.error("%s: stopped on an error: %r", self.who, error, exc_info=error)
            return EXIT_FAILED
        log.info("%s: pid %d exits", self.who, os.getpid())
        return EXIT_OK

    # --- the handlers ----------------------------------------------------------------------

    def handle_term(self, sig: signal.Signals) -> None:
        self._stop(f"{sig.name} received")

    def _stop(self, reason: str) -> None:
        if not self._stopping and self._successor is None:
            systemd.notify("STOPPING=1")
        self._stopping = True
        assert self._daemon is not None
        self._daemon.request_stop(reason)

    async def handle_hup(self) -> None:
        """Reload: start the program as it is on disk now, hand the socket over, leave."""
        old = os.getpid()
        if self._successor is not None:
            log.info("%s: SIGHUP: already handed over to pid %d", self.who, self._successor.pid)
            return
        if self._stopping:
            log.info("%s: SIGHUP: stopping, not reloading", self.who)
            return
        assert self._sock is not None and self._daemon is not None
        systemd.notify("RELOADING=1", systemd.monotonic_usec())
        try:
            argv = [program_path(), *sys.argv[1:]]
            log.info("%s: reload: starting %s", self.who, " ".join(argv))
            successor = await spawn_successor(argv, self._sock, self.ready_timeout)
        except AysError as err:  # ReloadError, or no program to run
            where = "the journal" if os.environ.get("JOURNAL_STREAM") else self.files.log_file
            why = f"{err} (its output is in {where})"
            log.error("%s: reload failed, pid %d serves on: %s", self.who, old, why)
            systemd.notify("READY=1", f"STATUS=reload failed, serving on: {err}")
            self._record_reload(old, None, why)
            return
        self._successor = successor
        new = successor.pid
        # From here on only the new process accepts: by the time `reload` hears of it, a new
        # connection reaches the new process.
        await stop_accepting([self._sock])
        try:
            self.pidfile.write(new)
        except ServiceError as err:
            log.error("%s: %s", self.who, err)
        systemd.notify(f"MAINPID={new}", "READY=1", f"STATUS=serving (pid {new})")
        self._record_reload(old, new, f"pid {old} handed over to pid {new}")
        log.info("%s: reload: pid %d serves now; pid %d lets go", self.who, new, old)
        self._daemon.hand_over()

    def _record_reload(self, old: int, new: int | None, message: str) -> None:
        path = self.files.reload_record
        previous = ReloadRecord.read(path)
        record = ReloadRecord(
            seq=(previous.seq if previous else 0) + 1,
            old_pid=old,
            new_pid=new,
            ok=new is not None,
            message=message,
            at=time.time(),
        )
        try:
            record.write(path)
        except OSError as err:
            log.error("%s: cannot record the reload in %s: %s", self.who, path, err.strerror)


def listen(ip: str, port: int, who: str) -> socket.socket:
    """Bind the listening socket, or fail naming the address (IPPROTO_TCP, so asyncio sets
    TCP_NODELAY on the connections)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((ip, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ServiceError(
            f"{who}: cannot listen on {ip}:{port}: {err.strerror}; another process may hold "
            f"the port: stop it, or choose another address with installConfig -p/-P"
        ) from None
    return sock


def _factory(role: Role, config: EnvConfig) -> DaemonFactory:
    if role == "manager":
        from ays_runtime.manager.service import Manager

        def manager(sock: socket.socket, gone: PredecessorGone | None) -> Daemon:
            daemon = Manager(config, sock=sock)
            daemon.predecessor_gone = gone
            return daemon

        return manager

    from ays_runtime.node.daemon import NodeDaemon

    def node(sock: socket.socket, gone: PredecessorGone | None) -> Daemon:
        return NodeDaemon(config, sock=sock)

    return node


def service_logging(log_file: Path) -> None:
    """Log to stderr (the journal under systemd, the log file under own supervision), and to
    the log file too unless stderr already is that file."""
    try:
        same = os.path.samestat(os.fstat(sys.stderr.fileno()), os.stat(log_file))
    except (OSError, ValueError):
        same = False
    configure_logging(debug=False, log_file=None if same else log_file)
    # Old and new process share the log during a reload: each line says whose it is.
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def run_service(role: Role, config: EnvConfig) -> int:
    """Run `role` as a service in the foreground (what `serve` does); the exit code."""
    files = ServiceFiles(role, config)
    inheritance = Inheritance.from_environ()
    service_umask()
    try:
        service_logging(files.log_file)
    except OSError as err:
        why = f"cannot write the log file {files.log_file}: {err.strerror}"
        inheritance.report_failure(why)
        raise ServiceError(why) from None
    runner = ServiceRunner(files, inheritance, _factory(role, config))
    return asyncio.run(runner.run())
