"""The shared access token: where it comes from, and how a presented one is checked.

`authenticate` is the one check of a caller: the HTTP guard (ays_runtime/web/guard.py) runs
it on the headers of every request to a guarded route, before the body is read.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ays_runtime.config import EnvConfig
from ays_runtime.exceptions import ConfigError

log = logging.getLogger("ays.auth")

TOKEN_FILE = "access_token"


def dev_token_path(config: EnvConfig) -> Path:
    return Path(config.manager.data_dir) / TOKEN_FILE


def resolve_access_token(config: EnvConfig, generate: bool) -> str:
    """The env's access token. Only the dev env may leave it empty: the manager (`generate`)
    then creates one on first start, stored 0600 in its data dir, where dev nodes read it."""
    token = config.access_token.get_secret_value()
    if token:
        return token
    if not config.is_dev:
        raise ConfigError(
            f"env {config.env}: field access_token is empty; set it in envs/{config.env}.yaml, "
            "e.g. access_token: ${AYS_ACCESS_TOKEN}, and export AYS_ACCESS_TOKEN before "
            "running installConfig"
        )
    path = dev_token_path(config)
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    if not generate:
        raise ConfigError(
            f"env dev: no access token yet at {path}; start the manager first (it creates one)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    log.info(
        "manager %s:%d: generated the dev access token; it is stored in %s (mode 0600)",
        config.manager.ip,
        config.manager.port,
        path,
    )
    return token


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as `authenticate` found out (routes read it as
    `request.state.caller`). `name` is for logs and never holds a secret."""

    kind: str  # "access_token": the env's shared token
    name: str


async def authenticate(headers: Mapping[str, str], access_token: str) -> Caller | None:
    """The caller presenting these request headers, or None when they present no valid
    credential. Reads only the headers (`Authorization: Bearer ...` or `X-Ays-Token`)."""
    presented = presented_token(headers.get("authorization"), headers.get("x-ays-token"))
    if token_matches(presented, access_token):
        return Caller("access_token", "access token")
    return None


def presented_token(authorization: str | None, x_ays_token: str | None) -> str:
    """The token a caller presented, from `Authorization: Bearer ...` or `X-Ays-Token`."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return (x_ays_token or "").strip()


def token_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison; an empty expected token never matches."""
    return bool(expected) and hmac.compare_digest(
        presented.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def auth_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
