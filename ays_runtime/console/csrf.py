"""CSRF protection of the console's writes.

Every request that changes something (any method but GET and HEAD) must carry the session's
CSRF token (`SessionGate.csrf_token`, an HMAC of the session id): a form as its hidden field
`csrf_token`, an htmx request as the header `X-CSRF-Token` (base.html sets it on <body> with
`hx-headers`, so every htmx request sends it). A write without it, or with another session's,
is refused with 403 before the route does anything. The SameSite=Strict cookie already keeps
other sites' requests out; this is the second lock the issue asks for.

Forms are urlencoded (`application/x-www-form-urlencoded`): `form(request)` reads one into
a dict of lists, without a multipart parser.
"""

from __future__ import annotations

import hmac
from urllib.parse import parse_qs

from fastapi import HTTPException, Request

from ays_runtime.console.session import COOKIE, Session, SessionGate, cookie_value

HEADER = "x-csrf-token"
FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Form = dict[str, list[str]]


async def form(request: Request) -> Form:
    """The request's urlencoded form (read once, kept on the request)."""
    cached: Form | None = getattr(request.state, "console_form", None)
    if cached is not None:
        return cached
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "the form is not UTF-8 text") from None
    parsed = parse_qs(text, keep_blank_values=True, max_num_fields=10_000)
    request.state.console_form = parsed
    return parsed


def session_of(request: Request) -> Session:
    """The request's session (the guard let it in, so there is one)."""
    gate: SessionGate = request.app.state.console_sessions
    session = gate.read(cookie_value(request.headers.get("cookie", ""), COOKIE))
    if session is None:
        raise HTTPException(401, "sign in first")
    return session


async def check(request: Request) -> None:
    """Refuse (403) a write that does not carry its session's CSRF token."""
    if request.method in SAFE_METHODS:
        return
    gate: SessionGate = request.app.state.console_sessions
    expected = gate.csrf_token(session_of(request))
    presented = request.headers.get(HEADER, "")
    if not presented and request.headers.get("content-type", "").startswith(
        "application/x-www-form-urlencoded"
    ):
        presented = (await form(request)).get(FIELD, [""])[0]
    if not presented or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise HTTPException(
            403, "this form has no valid CSRF token: reload the page and send it again"
        )
