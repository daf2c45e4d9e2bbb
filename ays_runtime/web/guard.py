"""The ASGI middleware in front of the manager's and the node's FastAPI apps.

For every HTTP request, before the app (and so before FastAPI reads or parses a body):

1. Routes not in the app's `PublicRoutes` need a caller: `authenticate(headers)` (one
   function, `ays_runtime.auth.authenticate`) must name one, or the answer is 401 and the body
   is never read. The caller is put in the request's state (`request.state.caller`). An app
   that signs browsers in (the manager's console) passes a `SessionGate`: the paths it
   `covers` need its session instead of a token, and its `refusal` answers without one (a
   redirect to the sign-in page); a token never opens them, a session never opens the API.
2. The body is bounded: a `Content-Length` beyond the route's `BodyLimit` is a 413 at once,
   unread; a body without one (chunked) is read up to the limit, and a 413 past it.
3. Every refusal, the guard's own and the app's (400, 401, 403, 405, 413, 415, 422, ...), goes
   to the `RefusalLog`: one line per source per minute, with a count.

A refusal whose body was not read says `Connection: close`, and is sent at once. The rest of
the body is then read and dropped, a chunk at a time, for up to `LINGER_S`, before the
connection closes (a 100 MB body without a token costs a chunk's worth of memory, never the
body's). That is nginx's "lingering close": a server that closes a socket with unread bytes
in its receive buffer resets it (TCP RST), and a client still sending its body may then
lose the refusal it was sent (it saw the status line and lost the error).

`protect(app, ...)` puts the guard in front of an app and makes its OpenAPI document say all
this (`document`): the security of every guarded operation, the 401/413/400 answers, and
integer bounds written as integers.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ays_runtime.auth import Caller
from ays_runtime.web.refusals import RefusalLog

Authenticate = Callable[[Mapping[str, str]], Awaitable[Caller | None]]

# Statuses that mean "this request was refused", as opposed to an answer (404: no such task).
REFUSALS = frozenset({400, 401, 403, 405, 411, 413, 415, 422, 431})
TOKEN_HEADER = "X-Ays-Token"
# How long a refusal keeps reading (and dropping) a body it did not read before it closes.
LINGER_S = 5.0
SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "a personal token, the env's access_token, or (nodes) its cluster_secret",
    },
    "ays_token": {
        "type": "apiKey",
        "in": "header",
        "name": TOKEN_HEADER,
        "description": "a personal token, the env's access_token, or (nodes) its cluster_secret",
    },
}


class Refusal(Protocol):
    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> dict[str, str]: ...
    @property
    def body(self) -> bytes: ...
    @property
    def content_type(self) -> str: ...


class SessionGate(Protocol):
    """Browser sessions for the paths it covers (ays_runtime/console/session.py)."""

    def covers(self, path: str) -> bool: ...

    async def caller(self, headers: Mapping[str, str]) -> Caller | None: ...

    def refusal(
        self, method: str, path: str, query: str, headers: Mapping[str, str]
    ) -> Refusal: ...


@dataclass(frozen=True)
class PublicRoutes:
    """The routes any caller may use without a token: exact paths, and path prefixes (a
    console that signs its users in with a session cookie is one). Everything else is
    guarded, including paths no route has (their 404 is for callers with a token)."""

    paths: frozenset[str]
    prefixes: tuple[str, ...] = ()

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and (
            path in self.paths or any(path.startswith(prefix) for prefix in self.prefixes)
        )


@dataclass(frozen=True)
class BodyLimit:
    """At most `bytes` of request body; `setting` is the config setting that raises it."""

    bytes: int
    setting: str


class BodyLimits:
    """`default` for every route, except the routes (path templates, `{name}` for a path
    part) given their own."""

    def __init__(self, default: BodyLimit, routes: Mapping[str, BodyLimit] | None = None):
        self.default = default
        self.routes = dict(routes or {})
        self._patterns = [
            (re.compile("^" + re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(path)) + "$"), limit)
            for path, limit in self.routes.items()
        ]

    def of(self, path: str) -> BodyLimit:
        for pattern, limit in self._patterns:
            if pattern.match(path):
                return limit
        return self.default


class Guard:
    """The middleware (see the module docstring). `who` starts its log lines; `error_key`
    is the key the app's error bodies use (`error` on the manager, `detail` on the node)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        public: PublicRoutes,
        authenticate: Authenticate,
        limits: BodyLimits,
        refusals: RefusalLog,
        error_key: str = "error",
        sessions: SessionGate | None = None,
    ) -> None:
        self.app = app
        self.public = public
        self.authenticate = authenticate
        self.limits = limits
        self.refusals = refusals
        self.error_key = error_key
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope["path"]
        source = scope["client"][0] if scope.get("client") else "unknown"
        what = f"{scope['method']} {path}"
        if path not in self.public and self.sessions and self.sessions.covers(path):
            caller = await self.sessions.caller(headers)
            if caller is None:
                query = scope.get("query_string", b"").decode("latin-1")
                refusal = self.sessions.refusal(scope["method"], path, query, headers)
                if refusal.status in REFUSALS:
                    self.refusals.refused(source, refusal.status, what, "no console session")
                raw = [
                    (b"content-type", refusal.content_type.encode()),
                    (b"content-length", str(len(refusal.body)).encode()),
                    (b"cache-control", b"no-store"),
                ]
                raw += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
                await _answer(
                    send, receive, refusal.status, raw, refusal.body, unread=_has_body(headers)
                )
                return
            scope.setdefault("state", {})["caller"] = caller
        elif path not in self.public:
            caller = await self.authenticate(headers)
            if caller is None:
                why = (
                    "bad or missing access token: send 'Authorization: Bearer <token>' or "
                    f"'{TOKEN_HEADER}: <token>' with a token this server takes (the manager: a "
                    "user's personal token or the env's access_token; a node: the env's "
                    "cluster_secret)"
                )
                self.refusals.refused(source, 401, what, "bad or missing access token")
                await self._refuse(
                    send,
                    receive,
                    401,
                    why,
                    unread=_has_body(headers),
                    extra={"WWW-Authenticate": "Bearer"},
                )
                return
            scope.setdefault("state", {})["caller"] = caller
        limit = self.limits.of(path)
        length = _content_length(headers)
        if length is not None and length > limit.bytes:
            self.refusals.refused(source, 413, what, f"a body of {length} bytes")
            await self._refuse(send, receive, 413, _too_large(length, limit), unread=True)
            return
        if length is None and "chunked" in headers.get("transfer-encoding", "").lower():
            body, ended = await _read_up_to(receive, limit.bytes)
            if body is None:
                self.refusals.refused(source, 413, what, "a chunked body over the limit")
                await self._refuse(send, receive, 413, _too_large(None, limit), unread=not ended)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, self._watching(send, source, what))

    def _watching(self, send: Send, source: str, what: str) -> Send:
        """`send`, noting a refusal the app answers (with the first words of its error)."""
        status = 0

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status in REFUSALS:
                why = _error_text(message.get("body", b""), self.error_key)
                self.refusals.refused(source, status, what, why)
                status = 0  # once per response
            await send(message)

        return watched

    async def _refuse(
        self,
        send: Send,
        receive: Receive,
        status: int,
        message: str,
        *,
        unread: bool,
        extra: dict[str, str] | None = None,
    ) -> None:
        body = json.dumps({self.error_key: message}).encode()
        raw = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        raw += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
        await _answer(send, receive, status, raw, body, unread=unread)


async def _answer(
    send: Send,
    receive: Receive,
    status: int,
    raw: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    unread: bool,
) -> None:
    """Send a refusal the guard answers itself, before the app reads the request's body
    (see the module docstring): if some of the body is `unread`, the answer closes the
    connection and goes out whole before the rest of the body is read and dropped."""
    if unread:
        raw = [*raw, (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": unread})
    if unread:
        await _drain(receive, LINGER_S)
        await send({"type": "http.response.body", "body": b""})


def protect(
    app: FastAPI,
    *,
    public: PublicRoutes,
    authenticate: Authenticate,
    limits: BodyLimits,
    refusals: RefusalLog,
    error_key: str = "error",
    sessions: SessionGate | None = None,
) -> None:
    """Put the guard in front of `app` and describe it in the app's OpenAPI document."""
    app.add_middleware(
        Guard,
        public=public,
        authenticate=authenticate,
        limits=limits,
        refusals=refusals,
        error_key=error_key,
        sessions=sessions,
    )
    app.state.refusals = refusals
    document(app, public, error_key)


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)


def _has_body(headers: Headers) -> bool:
    return bool(_content_length(headers)) or "transfer-encoding" in headers


def _too_large(length: int | None, limit: BodyLimit) -> str:
    size = f"the request body ({length} bytes)" if length is not None else "the request body"
    return (
        f"{size} is larger than the {limit.bytes} bytes this route takes; "
        f"the limit is the setting {limit.setting}"
    )


async def _read_up_to(receive: Receive, limit: int) -> tuple[bytes | None, bool]:
    """The whole body if it is at most `limit` bytes, else None (reading stops there), and
    whether the body has ended (False: the rest of it is still to be read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), True
        chunk = message.get("body", b"")
        size += len(chunk)
        ended = not message.get("more_body", False)
        if size > limit:
            return None, ended
        chunks.append(chunk)
        if ended:
            return b"".join(chunks), True


async def _drain(receive: Receive, seconds: float) -> None:
    """Read and drop the rest of a request's body, until it ends, the client goes, or
    `seconds` pass (a client that stops sending on a refusal closes the connection)."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
    except TimeoutError:
        return


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _error_text(body: bytes, key: str) -> str:
    """The error an app's refusal body states, shortened, for the log."""
    if body.lstrip()[:1] == b"<":  # a console page: its title says what was refused
        title = re.search(rb"<title>([^<]*)</title>", body)
        return title.group(1).decode("utf-8", "replace").strip() if title else "an HTML page"
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    text = data.get(key) if isinstance(data, dict) else None
    if isinstance(text, list) and text and isinstance(text[0], dict):  # FastAPI's own 422
        first = text[0]
        text = f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', '')}"
    return str(text)[:300] if text else ""


def allowed_methods(request: Request) -> str:
    """The `Allow` header of a 405: every method a route of the app takes at this path
    (Starlette names only the methods of the first route whose path matched)."""
    probe = {**request.scope, "method": "\0"}  # no route takes it: a path match is partial
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.matches(probe)[0] is Match.PARTIAL:
            methods |= route.methods or set()
    return ", ".join(sorted(methods))


# --- the OpenAPI document -------------------------------------------------------------------


def document(app: FastAPI, public: PublicRoutes, error_key: str = "error") -> None:
    """Make `app.openapi()` describe the guard: security schemes and requirements, 401 on
    guarded operations, 413 and 400 on operations with a body; integer bounds as integers."""
    generate = app.openapi
    completed = False

    def openapi() -> dict[str, Any]:
        nonlocal completed
        schema = generate()  # FastAPI's, cached on the app after the first call
        if not completed:
            complete(schema, public, error_key)
            completed = True
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(schema: dict[str, Any], public: PublicRoutes, error_key: str) -> None:
    error = {
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": [error_key],
                    "properties": {error_key: {"type": "string"}},
                }
            }
        }
    }
    schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if path not in public:
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
                responses.setdefault("401", {"description": "bad or missing access token", **error})
                responses.setdefault(
                    "403", {"description": "the caller's role does not allow it", **error}
                )
            if "requestBody" in operation:
                responses.setdefault(
                    "413", {"description": "the body is larger than the route takes", **error}
                )
                responses.setdefault(
                    "400", {"description": "the body is not JSON text (UTF-8)", **error}
                )
    _integral_bounds(schema)


def _integral_bounds(node: Any) -> None:
    """FastAPI's OpenAPI model holds bounds as floats (9007199254740991.0): an integer's are
    written back as integers, exactly (every bound of ours is below 2**53)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                value = node.get(key)
                if isinstance(value, float) and value.is_integer():
                    node[key] = int(value)
        for value in node.values():
            _integral_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _integral_bounds(value)
