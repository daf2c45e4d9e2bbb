"""Console sign-in: the signed session cookie, and the gate the HTTP guard asks about it.

A user signs in with their name and password (ays_runtime/users, argon2), or with the env's
access token (checked by `ays_runtime.auth.token_matches`, in constant time; an admin). The
manager then sets one cookie, `ays_session`:

    base64url({"sid": <random>, "exp": <unix seconds>, "user": <name>}) "." base64url(HMAC-SHA256)

(`user` is absent for a sign-in with the access token). The user's role and groups are read
on every request, so a user removed or given another role is so at once.

HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it), Path=/,
Max-Age = `console.session_hours`, Secure when `console.secure_cookie`. The signing key is
HMAC(`console.secret`, or the access token when that is empty, "ays console session"): a new
token or secret ends every session. The cookie holds no secret and no token.

Sessions are stateless, so any manager of the env with the same key accepts them. Signing
out revokes the session id on the manager that answered (kept in memory until the session
would have expired anyway) and clears the cookie.

`SessionGate` is what the guard (ays_runtime/web/guard.py) asks for every path it `covers`
(the console's: every path outside /api/, /openapi.json and the public ones): a valid
cookie is a `Caller("session", <the user>)`; without one, a page asks the browser to sign in (303 to
/login?next=...), an htmx fragment gets 401 with `HX-Redirect: /login`, anything else 401.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from ays_runtime.auth import Caller

COOKIE = "ays_session"
LOGIN_PATH = "/login"
# Paths the console does not own: the API (bearer tokens), its OpenAPI document, and the
# Prometheus metrics (a scraper sends the token, or none when the env opens them).
NOT_CONSOLE = ("/api/", "/openapi.json", "/metrics")
_SALT = b"ays console session v1"


@dataclass(frozen=True)
class Session:
    sid: str
    expires: float  # unix seconds
    user: str = ""  # "": signed in with the env's access token


# The signed-in user's current standing (ays_runtime/users), by name; None: no such user now.
UserLookup = Callable[[str], Awaitable[Caller | None]]
TOKEN_SESSION = Caller("session", "token", role="admin")


@dataclass(frozen=True)
class Refusal:
    status: int
    headers: dict[str, str]
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


class SessionGate:
    """Issues, checks and revokes console sessions (see the module docstring)."""

    def __init__(
        self,
        key_material: str,
        hours: float,
        secure: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not key_material:
            raise ValueError("a console session key needs the access token or console.secret")
        self._key = hmac.new(key_material.encode("utf-8"), _SALT, hashlib.sha256).digest()
        self.seconds = int(hours * 3600)
        self.secure = secure
        self.clock = clock
        self._revoked: dict[str, float] = {}  # sid -> its expiry
        self.users: UserLookup | None = None  # set by the console's mount

    # --- issuing and reading ----------------------------------------------------------------

    def issue(self, user: str = "") -> tuple[Session, str]:
        """A new session (of `user`; "": the access token's) and its cookie value."""
        session = Session(secrets.token_urlsafe(18), self.clock() + self.seconds, user)
        data: dict[str, object] = {"sid": session.sid, "exp": int(session.expires)}
        if user:
            data["user"] = user
        payload = json.dumps(data).encode()
        body = _b64(payload)
        return session, f"{body}.{_b64(self._sign(body.encode()))}"

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie value holds, if it is signed by us, unexpired and not revoked."""
        if not cookie or cookie.count(".") != 1:
            return None
        body, signature = cookie.split(".")
        try:
            good = hmac.compare_digest(_unb64(signature), self._sign(body.encode()))
            data = json.loads(_unb64(body)) if good else None
        except (ValueError, UnicodeError):
            return None
        if not isinstance(data, dict):
            return None
        sid, expires, user = data.get("sid"), data.get("exp"), data.get("user", "")
        if not isinstance(sid, str) or not isinstance(expires, int) or not isinstance(user, str):
            return None
        now = self.clock()
        if expires <= now or sid in self._revoked:
            return None
        return Session(sid, float(expires), user)

    def revoke(self, session: Session) -> None:
        now = self.clock()
        self._revoked = {s: e for s, e in self._revoked.items() if e > now}
        self._revoked[session.sid] = session.expires

    def csrf_token(self, session: Session) -> str:
        """The token every form and htmx write of this session carries (console/csrf.py)."""
        return hmac.new(self._key, b"csrf:" + session.sid.encode(), hashlib.sha256).hexdigest()

    def cookie_header(self, value: str) -> str:
        secure = "; Secure" if self.secure else ""
        return (
            f"{COOKIE}={value}; Max-Age={self.seconds}; Path=/; HttpOnly; SameSite=Strict{secure}"
        )

    def clearing_cookie_header(self) -> str:
        secure = "; Secure" if self.secure else ""
        return f"{COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict{secure}"

    def seal(self, data: dict[str, object]) -> str:
        """`data` signed with the session key (not encrypted: no secret goes in it)."""
        body = _b64(json.dumps(data).encode())
        return f"{body}.{_b64(self._sign(b'sealed:' + body.encode()))}"

    def unseal(self, value: str | None) -> dict[str, object] | None:
        """What `seal` made, if the signature holds; None otherwise."""
        if not value or value.count(".") != 1:
            return None
        body, signature = value.split(".")
        try:
            if not hmac.compare_digest(_unb64(signature), self._sign(b"sealed:" + body.encode())):
                return None
            data = json.loads(_unb64(body))
        except (ValueError, UnicodeError):
            return None
        return data if isinstance(data, dict) else None

    def _sign(self, data: bytes) -> bytes:
        return hmac.new(self._key, data, hashlib.sha256).digest()

    # --- what the guard asks ----------------------------------------------------------------

    def covers(self, path: str) -> bool:
        return not path.startswith(NOT_CONSOLE)

    async def caller(self, headers: Mapping[str, str]) -> Caller | None:
        session = self.read(cookie_value(headers.get("cookie", ""), COOKIE))
        if session is None:
            return None
        if not session.user:
            return TOKEN_SESSION
        if self.users is None:
            return None
        return await self.users(session.user)

    def refusal(self, method: str, path: str, query: str, headers: Mapping[str, str]) -> Refusal:
        """What a request without a valid session gets."""
        if headers.get("hx-request") == "true":
            return Refusal(401, {"HX-Redirect": LOGIN_PATH}, b"sign in first\n")
        if method in ("GET", "HEAD") and "text/event-stream" not in headers.get("accept", ""):
            target = path + (f"?{query}" if query else "")
            location = f"{LOGIN_PATH}?next={quote(target, safe='')}"
            return Refusal(303, {"Location": location}, b"sign in first\n")
        return Refusal(401, {}, b"sign in first: this console needs a session\n")


def cookie_value(header: str, name: str) -> str | None:
    """The value of cookie `name` in a Cookie header."""
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
