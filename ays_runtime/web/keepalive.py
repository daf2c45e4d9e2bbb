"""Idle keep-alive connections between Ays processes, set on purpose on both sides.

A client may only reuse an idle connection that its server still holds open. When both
sides drop idle connections after the same time (5 s: the default of uvicorn and of httpx
alike), a request made about 5 s after the last one can leave on a connection the server is
closing at that instant: the request is lost before any byte of answer, and the client sees
`ReadError` or `RemoteProtocolError` (a `*/5` task failed 4 % of its dispatches that way).
So every Ays client lets an idle connection go well before every Ays server does: the
client's clock starts later than the server's (after the answer has travelled and been
read), and the margin covers that and a loaded event loop. A request that still meets a
closed connection (a server that restarted, a proxy in between) is retried once on a fresh
connection by the callers that must not lose it (`ays_runtime.transport.http`).
"""

from __future__ import annotations

import httpx

# Seconds an Ays HTTP server (the manager's API, the node's API) keeps an idle connection.
SERVER_KEEP_ALIVE_S = 10
# Seconds an Ays HTTP client keeps an idle connection for reuse: well below the server's.
CLIENT_KEEP_ALIVE_S = 4.0


def client_limits(max_connections: int | None = 100) -> httpx.Limits:
    """Connection limits for an httpx client talking to an Ays server (idle expiry below
    the server's keep-alive; `max_connections` as httpx takes it)."""
    return httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=CLIENT_KEEP_ALIVE_S,
    )


def fresh_connection_limits() -> httpx.Limits:
    """Limits of a client that opens a new connection for every request (a retry after a
    send that met a connection the server had closed)."""
    return httpx.Limits(max_keepalive_connections=0)
