"""The env's secrets: the access token and the cluster secret, where they come from, and how
a presented one is checked.

* `access_token` ("env token"): the operators' shared token, with an admin's rights on the
  manager (users and their personal tokens: ays_runtime/users/).
* `cluster_secret`: what managers and nodes present to each other (dispatch, kill, output;
  heartbeats, start claims, results). A node takes no other credential, so no operator's
  token, personal or shared, runs anything on a node.

Both may be empty only in the dev env: the manager then generates them on first start,
stored 0600 in its data dir, where dev nodes (same host) read them.

`authenticate` is the one check of a caller: the HTTP guard (ays_runtime/web/guard.py) runs
it on the headers of every request to a guarded route, before the body is read.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ays_runtime.config import EnvConfig
from ays_runtime.exceptions import ConfigError

log = logging.getLogger("ays.auth")

TOKEN_FILE = "access_token"
CLUSTER_FILE = "cluster_secret"


def dev_token_path(config: EnvConfig) -> Path:
    return Path(config.manager.data_dir) / TOKEN_FILE


def dev_cluster_secret_path(config: EnvConfig) -> Path:
    return Path(config.manager.data_dir) / CLUSTER_FILE


def resolve_access_token(config: EnvConfig, generate: bool) -> str:
    """The env's access token. Only the dev env may leave it empty: the manager (`generate`)
    then creates one on first start, stored 0600 in its data dir, where dev nodes read it."""
    return _resolve(
        config, "access_token", config.access_token.get_secret_value(), TOKEN_FILE, generate
    )


def resolve_cluster_secret(config: EnvConfig, generate: bool) -> str:
    """The env's cluster secret (managers and nodes), resolved as the access token is."""
    return _resolve(
        config, "cluster_secret", config.cluster_secret.get_secret_value(), CLUSTER_FILE, generate
    )


def _resolve(config: EnvConfig, field: str, value: str, file: str, generate: bool) -> str:
    if value:
        return value
    if not config.is_dev:
        variable = f"AYS_{field.upper()}"
        raise ConfigError(
            f"env {config.env}: field {field} is empty; set it in envs/{config.env}.yaml, "
            f"e.g. {field}: ${{{variable}}}, and export {variable} before running installConfig"
            + (
                " (a long random value, e.g. from `openssl rand -hex 32`)"
                if file == CLUSTER_FILE
                else ""
            )
        )
    path = Path(config.manager.data_dir) / file
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    if not generate:
        raise ConfigError(
            f"env dev: no {field} yet at {path}; start the manager first (it creates one)"
        )
    secret = secrets.token_urlsafe(32)
    write_secret_file(path, secret)
    log.info(
        "manager %s:%d: generated the dev %s; it is stored in %s (mode 0600)",
        config.manager.ip,
        config.manager.port,
        field.replace("_", " "),
        path,
    )
    return secret


def write_secret_file(path: Path, secret: str) -> None:
    """`secret` into `path`, mode 0600 from the start, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as `authenticate` found out (routes read it as
    `request.state.caller`). `name` is for logs and the audit trail, never a secret.

    `role`: a `Role` value ("" for the cluster secret, which has none); `groups`: the node
    groups an operator may change; `cluster`: a manager or node of this env."""

    kind: str  # "access_token" (env token), "cluster", "user" (personal token), "session"
    name: str
    role: str = ""
    groups: frozenset[str] = frozenset()
    user_id: int | None = None
    cluster: bool = False


ENV_TOKEN_CALLER = Caller("access_token", "access token", role="admin", cluster=True)
CLUSTER_CALLER = Caller("cluster", "cluster", cluster=True)
# A personal token's lookup (ays_runtime/users/service.py), given the presented token.
UserLookup = Callable[[str], Awaitable[Caller | None]]


async def authenticate(
    headers: Mapping[str, str],
    access_token: str,
    cluster_secret: str = "",
    users: UserLookup | None = None,
) -> Caller | None:
    """The caller presenting these request headers, or None when they present no valid
    credential. Reads only the headers (`Authorization: Bearer ...` or `X-Ays-Token`).
    A node passes only its cluster secret (as `access_token`): it knows nothing else."""
    presented = presented_token(headers.get("authorization"), headers.get("x-ays-token"))
    if token_matches(presented, access_token):
        return ENV_TOKEN_CALLER
    if token_matches(presented, cluster_secret):
        return CLUSTER_CALLER
    if users is not None and presented:
        return await users(presented)
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
