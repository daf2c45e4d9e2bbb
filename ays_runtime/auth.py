"""The shared access token: where it comes from, and how a presented one is checked."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from ays_runtime.config import EnvConfig
from ays_runtime.exceptions import ConfigError

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
    print(f"manager: generated the dev access token; it is stored in {path} (mode 0600)")
    return token


def presented_token(authorization: str | None, x_ays_token: str | None) -> str:
    """The token a caller presented, from `Authorization: Bearer ...` or `X-Ays-Token`."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return (x_ays_token or "").strip()


def token_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison; an empty expected token never matches."""
    return bool(expected) and hmac.compare_digest(presented.encode(), expected.encode())


def auth_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
