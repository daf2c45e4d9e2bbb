"""Puts the console on the manager's app: sign-in and sign-out, static assets, /docs from
local assets, HTML error pages for console paths, and the page routers."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ays_runtime.auth import Caller, token_matches
from ays_runtime.console import alerts, csrf, nodes, oidc, overview, runs, tasks, workflows
from ays_runtime.console.render import STATIC, first, page
from ays_runtime.console.session import COOKIE, LOGIN_PATH, SessionGate, cookie_value
from ays_runtime.exceptions import ConflictError, NotFoundError, StorageError, ValidationError
from ays_runtime.manager.context import ManagerContext
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import User
from ays_runtime.users import lockout
from ays_runtime.users import service as users

STATIC_PREFIX = "/static/"
SWAGGER = "/static/vendor/swagger-ui-dist-5.35.0"
# The paths a browser without a session may load (manager/api.py adds them to PUBLIC).
PUBLIC_PATHS = frozenset({LOGIN_PATH, oidc.START_PATH, oidc.CALLBACK_PATH, "/favicon.ico"})
PUBLIC_PREFIXES = (STATIC_PREFIX,)

auth_router = APIRouter(include_in_schema=False)


def _safe_next(target: str) -> str:
    """Only a path of this site: never another host (an open redirect)."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target[1:2] in ("/", "\\"):
        return "/"
    return target


@auth_router.get(LOGIN_PATH, response_class=HTMLResponse)
async def login_form(request: Request, next: str = "/") -> HTMLResponse:
    return page(request, "login.html", next=_safe_next(next), username="", error="")


def _verify(ctx: ManagerContext, name: str, password: str) -> str | None:
    """The user's name if the password is theirs (argon2: in the thread pool)."""
    with ctx.sessions() as session:
        user = users.verify_login(session, name, password)
        return user.name if user is not None else None


def _user_lookup(ctx: ManagerContext) -> Callable[[str], Awaitable[Caller | None]]:
    def lookup(name: str) -> Caller | None:
        with ctx.sessions() as session:
            user = session.scalar(select(User).where(User.name == name))
            return users.caller_of(user, "session") if user is not None else None

    async def current(name: str) -> Caller | None:
        return await run_in_threadpool(lookup, name)

    return current


@auth_router.post(LOGIN_PATH, response_model=None)
async def login(request: Request) -> Response:
    form = await csrf.form(request)
    target = _safe_next(first(form, "next", "/"))
    ctx: ManagerContext = request.app.state.ays
    name, password = first(form, "username").strip(), first(form, "password")
    user = ""
    if name:
        address = request.client.host if request.client else ""
        limiter = lockout.Limiter(ctx.sessions, ctx.config.console.sign_in)
        attempt = await run_in_threadpool(limiter.admit, name, address)
        if isinstance(attempt, lockout.Refusal):
            return _locked_out(request, attempt, target, name)
        found = await run_in_threadpool(_verify, ctx, name, password)
        if found is None:
            await run_in_threadpool(limiter.failed, attempt)
            return page(
                request,
                "login.html",
                status_code=401,
                next=target,
                username=name,
                error="That name and password do not match a user of this environment.",
            )
        await run_in_threadpool(limiter.succeeded, attempt)
        user = found
    elif not token_matches(first(form, "token").strip(), ctx.access_token):
        return page(
            request,
            "login.html",
            status_code=401,
            next=target,
            username="",
            error="That is not this environment's access token.",
        )
    gate: SessionGate = request.app.state.console_sessions
    _, value = gate.issue(user)
    response = RedirectResponse(target, status_code=303)
    response.headers.append("set-cookie", gate.cookie_header(value))
    return response


def _locked_out(request: Request, refusal: lockout.Refusal, target: str, name: str) -> Response:
    """429 with Retry-After: the name or address is locked out (its password unchecked)."""
    now = utcnow()
    answer = page(
        request,
        "login.html",
        status_code=429,
        next=target,
        username=name,
        error=refusal.message(now),
    )
    answer.headers["Retry-After"] = str(refusal.seconds(now))
    return answer


@auth_router.post("/logout", dependencies=[Depends(csrf.check)])
async def logout(request: Request) -> Response:
    gate: SessionGate = request.app.state.console_sessions
    session = gate.read(cookie_value(request.headers.get("cookie", ""), COOKIE))
    if session is not None:
        gate.revoke(session)
    response = RedirectResponse(LOGIN_PATH, status_code=303)
    response.headers.append("set-cookie", gate.clearing_cookie_header())
    return response


@auth_router.get("/favicon.ico")
async def favicon() -> Response:
    return RedirectResponse("/static/favicon.svg", status_code=301)


def _docs_routes(app: FastAPI) -> None:
    """Swagger UI from the vendored swagger-ui-dist, never a CDN."""
    title = f"{app.title} - API"

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=title,
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER}/favicon-32x32.png",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()


def html_errors(app: FastAPI, gate: SessionGate) -> None:
    """On console paths, the app's exception handlers (the API's, added before this is
    called) answer an HTML page instead of JSON."""
    status_of: dict[type[Exception], int] = {
        NotFoundError: 404,
        ConflictError: 409,
        ValidationError: 422,
        RequestValidationError: 422,
        StorageError: 503,
    }

    for kind, handler in list(app.exception_handlers.items()):
        if not isinstance(kind, type):
            continue

        def wrapped(
            original: Callable[[Request, Any], Any], exc_type: type
        ) -> Callable[[Request, Exception], Awaitable[Response]]:
            async def handle(request: Request, exc: Exception) -> Response:
                if not gate.covers(request.url.path) or request.url.path.startswith("/static"):
                    answer = original(request, exc)
                    return await answer if inspect.isawaitable(answer) else answer
                status = exc.status_code if isinstance(exc, HTTPException) else 500
                status = status_of.get(exc_type, status)
                detail: Any = exc.detail if isinstance(exc, HTTPException) else str(exc)
                if status == 500:
                    detail = "internal error; see the manager log"
                return page(request, "error.html", status_code=status, status=status, detail=detail)

            return handle

        app.add_exception_handler(kind, wrapped(handler, kind))


def mount(app: FastAPI, ctx: ManagerContext) -> SessionGate:
    """Add the console to the manager's `app`; the gate is for the guard (web/guard.py)."""
    settings = ctx.config.console
    key = settings.secret.get_secret_value() or ctx.access_token
    gate = SessionGate(key, settings.session_hours, settings.secure_cookie)
    gate.users = _user_lookup(ctx)
    app.state.console_sessions = gate
    app.mount("/static", StaticFiles(directory=STATIC), name="console-static")
    _docs_routes(app)
    app.include_router(auth_router)
    app.include_router(oidc.router)
    for router in (
        overview.router,
        tasks.router,
        runs.router,
        nodes.router,
        workflows.router,
        alerts.router,
    ):
        app.include_router(router)
    return gate
