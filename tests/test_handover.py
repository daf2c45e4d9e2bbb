"""How the old process lets go of the listening socket after a reload (handover.py), checked
in-process: a uvicorn server stands for the old process, and a duplicate of the listening
descriptor (the same socket, as fd inheritance gives it) stands for the new one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

from ays_runtime.service.handover import ConnectionCloser, release_listener

REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


async def hello(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"hi"})


class QuietServer(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


async def start_old(sock: socket.socket) -> tuple[uvicorn.Server, ConnectionCloser, asyncio.Task]:
    closer = ConnectionCloser(hello)
    server = QuietServer(uvicorn.Config(closer, lifespan="off", log_config=None, access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    return server, closer, task


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One request on an open connection; the response head, lowercased (b"" if closed)."""
    writer.write(REQUEST)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(2)  # b"hi"
    return head.lower()


def test_a_kept_alive_connection_is_still_answered_after_the_handover_then_closed() -> None:
    async def scenario() -> None:
        sock = listening_socket()
        server, closer, task = await start_old(sock)
        reader, writer = await asyncio.open_connection(*sock.getsockname())
        first = await exchange(reader, writer)
        assert b"200 ok" in first and b"connection: close" not in first
        release = asyncio.create_task(release_listener(server, closer, linger=10))
        await asyncio.sleep(0.3)  # no longer accepting; the connection is idle meanwhile
        second = await exchange(reader, writer)  # a client sending just then is not refused
        assert b"200 ok" in second and b"connection: close" in second
        assert await reader.read() == b""  # then the old process closes it
        started = time.monotonic()
        assert await release == 0  # no connection left: it does not linger
        assert time.monotonic() - started < 8  # well before the 10 s linger
        writer.close()
        await writer.wait_closed()
        server.should_exit = True
        await task

    asyncio.run(scenario())


def test_connections_waiting_in_the_accept_queue_are_left_to_the_new_process() -> None:
    async def scenario() -> None:
        sock = listening_socket()
        new_process = socket.socket(fileno=os.dup(sock.fileno()))  # the inherited socket
        server, closer, task = await start_old(sock)
        assert await release_listener(server, closer, linger=0.2) == 0
        waiting = socket.create_connection(sock.getsockname(), timeout=5)
        waiting.sendall(REQUEST)
        await asyncio.sleep(0.3)
        assert not server.server_state.connections  # the old process took nothing more
        server.should_exit = True
        await task  # its copy of the socket is closed now
        new_process.settimeout(5)
        accepted, _ = new_process.accept()
        with accepted:
            assert accepted.recv(1024).startswith(b"GET / ")
            accepted.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnew")
        assert waiting.recv(1024).endswith(b"new")  # answered, not reset
        waiting.close()
        new_process.close()

    asyncio.run(scenario())
