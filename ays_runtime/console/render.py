"""Templates and what every console route shares: rendering a page or its htmx fragment,
the manager context, running database work off the event loop, the console's actor.

Templates are Jinja2 with StrictUndefined (a missing value is an error, never an empty
string) and autoescape on. A page template extends base.html; a fragment that htmx swaps is
a partial (`_name.html`) the page includes, rendered alone when the request comes from htmx
(`HX-Request: true`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlencode

import jinja2
from fastapi import Query, Request
from fastapi.responses import HTMLResponse
from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ays_runtime import __version__
from ays_runtime.audit import trail
from ays_runtime.console import csrf
from ays_runtime.console.session import COOKIE
from ays_runtime.exceptions import ValidationError
from ays_runtime.manager.context import ManagerContext
from ays_runtime.manager.versions import Actor
from ays_runtime.storage import database
from ays_runtime.vocabulary import AuditAction, ChangeVia, Role
from ays_runtime.web.fields import UtcIn

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"


def console_actor(request: Request) -> Actor:
    """Who makes a console change, as the task history and the audit trail record it: the
    signed-in user ("token" after a sign-in with the access token), via the console, from
    the browser's address."""
    caller = getattr(request.state, "caller", None)
    who = caller.name if caller is not None and caller.user_id is not None else "token"
    return Actor(who, ChangeVia.CONSOLE, request.client.host if request.client else "")


async def audit_done(
    request: Request, action: AuditAction, target: str, what: dict[str, Any]
) -> None:
    """Record a trigger or a kill made from the console in the audit trail."""
    actor = console_actor(request)
    await in_session(request, lambda s: trail.record_done(s, actor, action, target, what))


PAGE_SIZE = 50
# Every page: never cached (it shows a session's data), never framed by another site.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
PageNo = Annotated[str, Query(alias="page", description="page number, from 1")]
log = logging.getLogger("ays.console")
T = TypeVar("T")


def _when(moment: datetime | None) -> str:
    """A stored (naive UTC) time as the console shows it."""
    if moment is None:
        return "—"
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _iso(moment: datetime | None) -> str:
    if moment is None:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _query(params: Mapping[str, Any], **changes: Any) -> str:
    """A query string: `params` with `changes`, empty values left out."""
    merged = {**params, **changes}
    return urlencode({k: v for k, v in merged.items() if v not in (None, "")})


environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    undefined=jinja2.StrictUndefined,
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
environment.filters["when"] = _when
environment.filters["iso"] = _iso
environment.globals["query"] = _query
environment.globals["version"] = __version__


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render `template` with what base.html needs (nav, CSRF token) and `context`."""
    gate = request.app.state.console_sessions
    session = gate.read(_cookie(request))
    token = gate.csrf_token(session) if session is not None else ""
    html = environment.get_template(template).render(
        request_path=request.url.path,
        csrf_token=token,
        csrf_field=csrf.FIELD,
        signed_in=session is not None,
        oidc_name=_oidc_name(request),
        **_standing(request),
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers=PAGE_HEADERS)


def _standing(request: Request) -> dict[str, Any]:
    """Who is signed in and what the page may offer them (access.py refuses the rest)."""
    caller = getattr(request.state, "caller", None)
    role = Role(caller.role) if caller is not None and caller.role else Role.VIEWER
    return {
        "user_name": caller.name if caller is not None else "",
        "user_role": role.value,
        "can_operate": role.rank >= Role.OPERATOR.rank,
        "is_admin": role == Role.ADMIN,
    }


def _oidc_name(request: Request) -> str:
    """The provider's name for the login page's button; "": OIDC sign-in is off."""
    oidc = request.app.state.ays.config.console.oidc
    return oidc.name if oidc is not None else ""


def _cookie(request: Request) -> str | None:
    return request.cookies.get(COOKIE)


def context_of(request: Request) -> ManagerContext:
    ctx: ManagerContext = request.app.state.ays
    return ctx


async def in_session(request: Request, work: Callable[[Session], T]) -> T:
    """Run `work(session)` in the thread pool, in a database session of its own; tried again
    on a transient database error (`work` commits what it writes)."""
    sessions = context_of(request).sessions
    return await run_in_threadpool(
        database.in_session, sessions, work, "manager: the console", commit=False
    )


async def tasks_changed(request: Request) -> None:
    """Tell the manager its tasks changed (it reconciles at once; the tick repairs a miss)."""
    try:
        await context_of(request).on_tasks_changed()
    except Exception:  # the change is committed; the next reconcile tick installs it
        log.exception("console: reconcile after a change failed; the next tick repairs it")


def first(form: csrf.Form, name: str, default: str = "") -> str:
    return form.get(name, [default])[0]


def page_number(value: str | None) -> int:
    try:
        number = int(value or 1)
    except ValueError:
        return 1
    return min(max(number, 1), 10_000)


def moment_of(field: str, text: str) -> datetime | None:
    """A time filter as the API reads it (ISO 8601, UTC when no offset is given)."""
    if not text.strip():
        return None
    try:
        moment: datetime = TypeAdapter(UtcIn).validate_python(text.strip())
    except PydanticError:
        raise ValidationError(field, text, "a date-time such as 2026-05-01T08:00") from None
    return moment
