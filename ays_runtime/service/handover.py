"""Reload without interruption: the listening socket passes from the old process to a new one.

The old process (which serves) spawns the new one, the program as it is on disk now (after an
upgrade, the new version), with three file descriptors inherited through exec and named in
its environment:

    AYS_LISTEN_FD        the listening socket itself: the same socket, not a copy bound again,
                         so not one connection waiting in its accept queue is lost or reset
    AYS_READY_FD         a pipe the new process answers on: "READY <pid>" once it serves,
                         "FAIL <why>" when it cannot (then it exits), or nothing (it died)
    AYS_PREDECESSOR_FD   a pipe whose other end only the old process holds: it reads EOF
                         once the old process has exited (crash included)

Until it hears READY, the old process serves as before; a new process that fails, exits or is
not ready within the timeout is stopped, and the old one goes on (`ReloadError` says why).
After READY the old process lets go of the socket without resetting anything:

1. it stops reading the listening socket (remove_reader), then lets the connections it has
   already accepted finish their set-up before anything is closed: asyncio creates the
   transport of an accepted connection in a task of its own, and `Server.close()` in between
   resets that connection (python/cpython#109564). From then on the kernel hands every new
   connection, and those waiting in the accept queue, to the new process; only then does the
   old one announce the new pid (pidfile, systemd's MAINPID, the reload record);
2. every response it still sends says `Connection: close` (`ConnectionCloser`), so clients
   open their next connection, which the new process accepts;
3. it waits for its open connections to end (at most the keep-alive timeout plus a second:
   an idle keep-alive connection would be closed by then anyway) and then closes its copy of
   the socket, which the new process still holds open.

`start` uses the same AYS_READY_FD pipe to learn that a daemon it launched is serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import uvicorn

from ays_runtime.exceptions import ReloadError, ServiceError

log = logging.getLogger("ays.service")

LISTEN_FD = "AYS_LISTEN_FD"
READY_FD = "AYS_READY_FD"
PREDECESSOR_FD = "AYS_PREDECESSOR_FD"
# Set by an installed launcher to its own path: the program to run again on reload.
PROGRAM = "AYS_PROGRAM"

# A new process migrates the schema and reconciles before it is ready; generous.
READY_TIMEOUT = 60.0
EXIT_WAIT = 10.0  # a new process that said FAIL, or was told to stop, gets this long to exit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# --- the program -------------------------------------------------------------------------


def program_path() -> str:
    """The path of the program this process runs, as a new process would exec it now.

    An installed launcher names itself in AYS_PROGRAM; a PyInstaller bundle is the path it
    was called by (a multicall bundle tells the programs apart by that name); otherwise the
    entry-point script."""
    launcher = os.environ.get(PROGRAM, "")
    if launcher and os.path.isfile(launcher):
        return os.path.abspath(launcher)
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c") else ""
    if argv0 and os.sep not in argv0:
        argv0 = shutil.which(argv0) or ""
    if argv0 and os.path.isfile(argv0):
        return os.path.abspath(argv0)
    if getattr(sys, "frozen", False):
        return sys.executable
    raise ServiceError(
        f"cannot tell which program this is (argv[0] {sys.argv[0]!r}); run it by its path, "
        f"or set {PROGRAM}"
    )


# --- the new process's side --------------------------------------------------------------


@dataclass
class Inheritance:
    """What a new process was handed (all None for a process started afresh)."""

    listen_fd: int | None = None
    ready_fd: int | None = None
    predecessor_fd: int | None = None

    @classmethod
    def from_environ(cls) -> Inheritance:
        """Take the descriptors out of the environment (so no child of ours sees them)."""
        return cls(
            listen_fd=_fd_from_env(LISTEN_FD),
            ready_fd=_fd_from_env(READY_FD),
            predecessor_fd=_fd_from_env(PREDECESSOR_FD),
        )

    @property
    def successor(self) -> bool:
        return self.listen_fd is not None

    def adopt_socket(self, ip: str, port: int) -> socket.socket | None:
        """The inherited listening socket, checked to listen on ip:port; None if none."""
        if self.listen_fd is None:
            return None
        try:
            sock = socket.socket(fileno=self.listen_fd)
        except OSError as err:
            raise ServiceError(f"{LISTEN_FD}={self.listen_fd}: not a socket: {err}") from None
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.close()
            raise ServiceError(f"{LISTEN_FD}={self.listen_fd}: the socket is not listening")
        host, bound_port = sock.getsockname()[:2]
        if (_normal_ip(host), bound_port) != (_normal_ip(ip), port):
            sock.close()
            raise ServiceError(
                f"the config now says {ip}:{port} but the socket handed over listens on "
                f"{host}:{bound_port}; a reload cannot move the address: use restart"
            )
        sock.set_inheritable(False)
        return sock

    def report_ready(self) -> None:
        self._answer(f"READY {os.getpid()}")

    def report_failure(self, why: str) -> None:
        self._answer("FAIL " + " ".join(why.split()))

    def _answer(self, line: str) -> None:
        if self.ready_fd is None:
            return
        fd, self.ready_fd = self.ready_fd, None
        try:
            os.write(fd, line.encode("utf-8", "replace")[:4000] + b"\n")
        except OSError as err:  # the one waiting has gone: nothing to tell
            log.warning("cannot report %r to the process that started this one: %s", line, err)
        finally:
            os.close(fd)

    async def predecessor_gone(self) -> None:
        """Return once the process that handed over to this one has exited."""
        fd = self.predecessor_fd
        if fd is None:
            return
        loop = asyncio.get_running_loop()
        gone = loop.create_future()

        def readable() -> None:
            try:
                data = os.read(fd, 64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data and not gone.done():
                gone.set_result(None)

        os.set_blocking(fd, False)
        loop.add_reader(fd, readable)
        try:
            await gone
        finally:
            loop.remove_reader(fd)
            os.close(fd)
            self.predecessor_fd = None


def _fd_from_env(name: str) -> int | None:
    value = os.environ.pop(name, None)
    if value is None:
        return None
    try:
        fd = int(value)
        os.set_inheritable(fd, False)  # ours alone: not for the jobs a node runs
    except (ValueError, OSError):
        raise ServiceError(f"{name}={value!r}: not an open file descriptor") from None
    return fd


def _normal_ip(host: str) -> str:
    return host.removeprefix("::ffff:")


# --- the old process's side --------------------------------------------------------------


@dataclass
class Successor:
    """A new process that said READY. `lifeline` stays open in the old process until it exits
    (the new one's AYS_PREDECESSOR_FD reads EOF then)."""

    proc: subprocess.Popen[bytes]
    lifeline: int

    @property
    def pid(self) -> int:
        return self.proc.pid


async def spawn_successor(
    argv: list[str], sock: socket.socket, timeout: float = READY_TIMEOUT
) -> Successor:
    """Run `argv` with `sock` handed over, and wait for it to be ready. Raises ReloadError
    (after stopping the new process, if it still runs) when it is not."""
    ready_r, ready_w = os.pipe()
    life_r, life_w = os.pipe()
    env = dict(os.environ)
    env.update({LISTEN_FD: str(sock.fileno()), READY_FD: str(ready_w), PREDECESSOR_FD: str(life_r)})
    try:
        proc = subprocess.Popen(  # noqa: S603 - our own program
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            pass_fds=(sock.fileno(), ready_w, life_r),
            close_fds=True,
        )
    except OSError as err:
        for fd in (ready_r, ready_w, life_r, life_w):
            os.close(fd)
        raise ReloadError(f"cannot run {argv[0]}: {err.strerror or err}") from None
    os.close(ready_w)
    os.close(life_r)
    try:
        answer = await _read_answer(ready_r, timeout)
    finally:
        os.close(ready_r)
    try:
        check_answer(answer, proc, argv[0], timeout)
    except ReloadError:
        os.close(life_w)
        await asyncio.to_thread(stop_process, proc)
        raise
    return Successor(proc, life_w)


def check_answer(
    answer: bytes | None, proc: subprocess.Popen[bytes], program: str, timeout: float
) -> int:
    """The pid of a process that answered READY; ReloadError saying why otherwise."""
    text = (answer or b"").decode("utf-8", "replace").strip()
    if text.startswith("READY"):
        return proc.pid
    if text.startswith("FAIL"):
        raise ReloadError(f"{program} (pid {proc.pid}) failed to start: {text[5:]}")
    if answer is None:
        raise ReloadError(f"{program} (pid {proc.pid}) was not ready within {timeout:g}s")
    try:
        code = proc.wait(EXIT_WAIT)
    except subprocess.TimeoutExpired:
        raise ReloadError(
            f"{program} (pid {proc.pid}) closed its ready pipe without saying READY"
        ) from None
    raise ReloadError(f"{program} (pid {proc.pid}) {exit_description(code)} before it was ready")


def exit_description(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Stop a new process that will not take over: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(EXIT_WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _read_answer(fd: int, timeout: float) -> bytes | None:
    """The new process's answer line; b"" when it closed the pipe without one; None when
    nothing came within `timeout`."""
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[bytes] = loop.create_future()
    received = bytearray()

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        received.extend(chunk)
        if (not chunk or b"\n" in received) and not answered.done():
            answered.set_result(bytes(received).partition(b"\n")[0])

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        return await asyncio.wait_for(answered, timeout)
    except TimeoutError:
        return None
    finally:
        loop.remove_reader(fd)


def read_answer_blocking(fd: int, timeout: float) -> bytes | None:
    """`_read_answer` for a caller without an event loop (the `start` command)."""
    deadline = time.monotonic() + timeout
    received = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        received.extend(chunk)
        if not chunk or b"\n" in received:
            return bytes(received).partition(b"\n")[0]


# --- letting go of the listening socket --------------------------------------------------


class ConnectionCloser:
    """ASGI wrapper: once `closing` is set, every response says `Connection: close`, so the
    client's next request opens a new connection (which the new process accepts)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.closing = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if self.closing and message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if (b"connection", b"close") not in headers:
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)


async def stop_accepting(sockets: list[Any]) -> None:
    """Stop reading the listening sockets (their connections wait for the new process), and
    let the connections already accepted get their transports, which asyncio sets up in
    tasks of their own: closing the server before that resets them (cpython#109564)."""
    loop = asyncio.get_running_loop()
    for sock in sockets:
        loop.remove_reader(sock.fileno())  # False (and harmless) the second time
    for _ in range(5):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)


async def release_listener(
    server: uvicorn.Server, closer: ConnectionCloser, linger: float | None = None
) -> int:
    """Let go of the listening socket after a handover (see the module docstring); returns
    how many connections were still open when `linger` ran out (uvicorn's shutdown then
    ends them as it does at any stop)."""
    closer.closing = True
    await stop_accepting(
        [sock for listening in getattr(server, "servers", []) for sock in listening.sockets]
    )
    if linger is None:
        linger = server.config.timeout_keep_alive + 1.0
    deadline = time.monotonic() + linger
    while server.server_state.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return len(server.server_state.connections)
