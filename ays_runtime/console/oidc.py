"""Optional console sign-in with an OpenID Connect provider (env config `console.oidc`).

Contract:
- GET /login/oidc?next=...: reads the provider's discovery document
  (`{issuer}/.well-known/openid-configuration`, kept 5 minutes), makes a state, a nonce and a
  PKCE verifier (S256), keeps them with `next` in a short-lived cookie signed with the
  console's session key (`ays_oidc`, SameSite=Lax so that it comes back with the provider's
  redirect; no secret in it: the verifier is useless without the code), and redirects to the
  provider's authorization endpoint (authorization code flow).
- GET /login/oidc/callback: refuses (a 4xx page saying why) a missing or foreign sign-in cookie,
  a state that differs, a provider error; exchanges the code (client_secret_basic, the
  verifier) for tokens; checks the ID token's signature against the provider's JWKS and its
  iss, aud, exp and nonce (joserfc, Authlib's JOSE library); maps the roles claim through
  `console.oidc.mapping` (highest role wins; an operator gets every group its matching values
  grant); none maps: refused, or a viewer when `default_role: viewer`.
- The user (named by `username_claim`, else `sub`) is created with source "oidc" and no
  password, or updated to the claim's role and groups on every sign-in; both are audited
  (ays_runtime/audit) with who "oidc". A local user of the same name is never taken over.
- The client secret is sent to the token endpoint only: never logged, never in a page.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any
from urllib.parse import quote

import httpx
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ays_runtime.config import OidcSettings
from ays_runtime.console.render import page
from ays_runtime.console.session import SessionGate, cookie_value
from ays_runtime.exceptions import ValidationError
from ays_runtime.manager.context import ManagerContext
from ays_runtime.manager.versions import Actor
from ays_runtime.storage.database import in_session
from ays_runtime.storage.models import User
from ays_runtime.users import service as users
from ays_runtime.vocabulary import ChangeVia

log = logging.getLogger(__name__)

START_PATH = "/login/oidc"
CALLBACK_PATH = "/login/oidc/callback"
COOKIE = "ays_oidc"
FLOW_SECONDS = 600  # a sign-in started longer ago than this starts again
DISCOVERY_SECONDS = 300
HTTP_TIMEOUT = 10.0
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]
RANK = {"viewer": 0, "operator": 1, "admin": 2}

router = APIRouter(include_in_schema=False)
_discovery: dict[str, tuple[float, dict[str, Any]]] = {}


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def settings_of(request: Request) -> OidcSettings | None:
    ctx: ManagerContext = request.app.state.ays
    return ctx.config.console.oidc


async def _get_json(client: httpx.AsyncClient, url: str, what: str) -> dict[str, Any]:
    try:
        answer = await client.get(url)
        answer.raise_for_status()
        data = answer.json()
    except (httpx.HTTPError, ValueError) as err:
        log.warning("OIDC: cannot read the %s at %s: %s", what, url, type(err).__name__)
        raise Refused(
            502, f"The sign-in provider's {what} cannot be read; try again later."
        ) from None
    if not isinstance(data, dict):
        raise Refused(502, f"The sign-in provider's {what} is not a JSON object.")
    return data


async def _metadata(client: httpx.AsyncClient, oidc: OidcSettings) -> dict[str, Any]:
    cached = _discovery.get(oidc.issuer)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    url = f"{oidc.issuer}/.well-known/openid-configuration"
    data = await _get_json(client, url, "discovery document")
    for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        if not isinstance(data.get(field), str):
            raise Refused(502, f"The sign-in provider's discovery document has no {field}.")
    if data.get("issuer") != oidc.issuer:
        raise Refused(502, "The sign-in provider's discovery document names another issuer.")
    _discovery[oidc.issuer] = (time.monotonic() + DISCOVERY_SECONDS, data)
    return data


def _refusal(request: Request, status: int, message: str) -> HTMLResponse:
    return page(request, "login.html", status_code=status, next="/", username="", error=message)


@router.get(START_PATH, response_model=None)
async def start(request: Request, next: str = "/") -> Response:
    from ays_runtime.console.app import _safe_next  # the one open-redirect check

    oidc = settings_of(request)
    if oidc is None:
        return _refusal(request, 404, "Sign-in with a provider is not configured here.")
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            meta = await _metadata(client, oidc)
    except Refused as refused:
        return _refusal(request, refused.status, refused.message)
    state, nonce, verifier = generate_token(32), generate_token(32), generate_token(64)
    location = prepare_grant_uri(
        meta["authorization_endpoint"],
        oidc.client_id,
        "code",
        redirect_uri=oidc.redirect_base + CALLBACK_PATH,
        scope=" ".join(oidc.scopes),
        state=state,
        nonce=nonce,
        code_challenge=create_s256_code_challenge(verifier),
        code_challenge_method="S256",
    )
    gate: SessionGate = request.app.state.console_sessions
    flow = {
        "state": state,
        "nonce": nonce,
        "verifier": verifier,
        "next": _safe_next(next),
        "exp": int(time.time()) + FLOW_SECONDS,
    }
    response = RedirectResponse(location, status_code=303)
    secure = "; Secure" if gate.secure else ""
    response.headers.append(
        "set-cookie",
        f"{COOKIE}={gate.seal(flow)}; Max-Age={FLOW_SECONDS}; Path={CALLBACK_PATH}; "
        f"HttpOnly; SameSite=Lax{secure}",
    )
    return response


def _claim_values(claims: dict[str, Any], name: str) -> list[str]:
    value = claims.get(name)
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def grant_of(oidc: OidcSettings, claims: dict[str, Any]) -> tuple[str, list[str]] | None:
    """The role and groups the roles claim maps to; None: nothing maps and sign-in is refused."""
    values = set(_claim_values(claims, oidc.roles_claim))
    matched = [m for m in oidc.mapping if m.value in values]
    if not matched:
        return ("viewer", []) if oidc.default_role == "viewer" else None
    role = max((m.role for m in matched), key=RANK.__getitem__)
    groups: list[str] = []
    if role == "operator":
        for m in matched:
            groups += [g for g in m.groups if g not in groups]
    return role, groups


def _sign_in_user(ctx: ManagerContext, name: str, role: str, groups: list[str], source: str) -> str:
    """Create or update the OIDC user; the name, or raise Refused."""
    actor = Actor("oidc", ChangeVia.CONSOLE, source)

    def sign_in(session: Session) -> None:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            users.create_user(session, actor, name, role, groups, source="oidc")
        elif user.source != "oidc":
            raise Refused(
                403,
                f"A local user named {name!r} exists; the provider cannot sign in as them. "
                "Ask an admin to remove or rename the local user.",
            )
        elif user.role != role or list(user.groups or []) != groups:
            users.update_user(session, actor, name, role=role, groups=groups)

    in_session(ctx.sessions, sign_in, "manager: OIDC sign-in", commit=True)
    return name


@router.get(CALLBACK_PATH, response_model=None)
async def callback(request: Request) -> Response:
    oidc = settings_of(request)
    if oidc is None:
        return _refusal(request, 404, "Sign-in with a provider is not configured here.")
    gate: SessionGate = request.app.state.console_sessions
    try:
        name, target = await _finish(request, oidc, gate)
    except Refused as refused:
        response = _refusal(request, refused.status, refused.message)
        response.headers.append("set-cookie", f"{COOKIE}=; Max-Age=0; Path={CALLBACK_PATH}")
        return response
    _, value = gate.issue(name)
    # A page, not a redirect: the session cookie is SameSite=Strict, and a browser would not
    # send it on a redirect that began at the provider's site.
    link = quote(target, safe="/?=&%")
    html = (
        '<!doctype html><meta charset="utf-8"><title>Signed in</title>'
        f'<meta http-equiv="refresh" content="0;url={link}">'
        f'<p>Signed in as {_escape(name)}. <a href="{link}">Continue</a></p>'
    )
    response = HTMLResponse(html)
    response.headers.append("set-cookie", gate.cookie_header(value))
    response.headers.append("set-cookie", f"{COOKIE}=; Max-Age=0; Path={CALLBACK_PATH}")
    return response


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


async def _finish(request: Request, oidc: OidcSettings, gate: SessionGate) -> tuple[str, str]:
    flow = gate.unseal(cookie_value(request.headers.get("cookie", ""), COOKIE))
    expires = flow.get("exp") if flow is not None else None
    if flow is None or not isinstance(expires, int) or expires < time.time():
        raise Refused(400, "This sign-in was not started here or took too long; sign in again.")
    query = request.query_params
    state = query.get("state", "")
    if not secrets.compare_digest(state.encode(), str(flow.get("state", "")).encode()):
        raise Refused(400, "The sign-in's state does not match the one sent; sign in again.")
    if error := query.get("error"):
        raise Refused(401, f"The sign-in provider refused: {error[:100]}.")
    code = query.get("code", "")
    if not code:
        raise Refused(400, "The sign-in provider sent no code; sign in again.")
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
        meta = await _metadata(client, oidc)
        try:
            answer = await client.post(
                meta["token_endpoint"],
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": oidc.redirect_base + CALLBACK_PATH,
                    "code_verifier": str(flow.get("verifier", "")),
                },
                auth=(oidc.client_id, oidc.client_secret.get_secret_value()),
                headers={"accept": "application/json"},
            )
            tokens = answer.json() if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as err:
            log.warning("OIDC: token request failed: %s", type(err).__name__)
            raise Refused(502, "The sign-in provider's token endpoint cannot be reached.") from None
        if not isinstance(tokens, dict) or not isinstance(tokens.get("id_token"), str):
            log.warning("OIDC: the token endpoint answered %s", answer.status_code)
            raise Refused(401, "The sign-in provider did not give an ID token; sign in again.")
        jwks = await _get_json(client, meta["jwks_uri"], "key set")
    claims = _verified_claims(oidc, tokens["id_token"], jwks, str(flow.get("nonce", "")))
    name = claims.get(oidc.username_claim) or claims.get("sub")
    try:
        name = users.check_name(str(name or ""))
    except ValidationError:
        raise Refused(
            403, f"The provider's {oidc.username_claim!r} is not a usable user name."
        ) from None
    grant = grant_of(oidc, claims)
    if grant is None:
        raise Refused(
            403,
            f"{name} is not allowed in this console: no value of the {oidc.roles_claim!r} claim "
            "maps to a role. Ask an admin to add it to console.oidc.mapping.",
        )
    role, groups = grant
    source = request.client.host if request.client else ""
    await run_in_threadpool(_sign_in_user, request.app.state.ays, name, role, groups, source)
    return name, str(flow.get("next", "/"))


def _verified_claims(
    oidc: OidcSettings, id_token: str, jwks: dict[str, Any], nonce: str
) -> dict[str, Any]:
    try:
        keys = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
        token = jwt.decode(id_token, keys, algorithms=ALGORITHMS)
        jwt.JWTClaimsRegistry(
            iss={"essential": True, "value": oidc.issuer},
            aud={"essential": True, "value": oidc.client_id},
            exp={"essential": True},
            nonce={"essential": True, "value": nonce},
        ).validate(token.claims)
    except (JoseError, ValueError, TypeError) as err:
        log.warning("OIDC: ID token refused: %s", type(err).__name__)
        raise Refused(
            401, "The ID token from the sign-in provider did not verify; refused."
        ) from None
    return dict(token.claims)
