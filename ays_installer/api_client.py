"""The manager's HTTP API as the command line uses it (`task`, `run`, `apply`, `export`,
`node`, `logs`, `reconcile`): never the database.

Where the manager is: `--url URL` (or AYS_URL), else the address in the manager's config
(found as every command finds it: `--config FILE`, `-e ENV`, `--root DIR`). The token:
AYS_TOKEN, else the config's `access_token` (in dev, the file the manager generated in its data
dir). The token is never printed, and never taken from the command line (`ps` would show it).

What an answer means, as the command's exit code:

    0  done
    1  the thing failed (the manager refused it: a conflict, the run failed, a server error)
    2  bad usage (a bad flag or field: the message names it)
    3  not found (no such task, run or version)
    4  cannot reach the manager (not running, wrong address, or it refused the token)
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from ays_installer.options import choose_config, fail
from ays_runtime.auth import auth_headers, resolve_access_token
from ays_runtime.exceptions import AysError
from ays_runtime.protocol import ACTOR_HEADER, API

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNREACHABLE = 4

TOKEN_VAR = "AYS_TOKEN"
URL_VAR = "AYS_URL"
TIMEOUT = 30.0  # a kill waits for the node to end the job


# The options of every command that talks to the manager (with -e, --config, --root).
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar=URL_VAR,
        metavar="URL",
        help="The manager's address, e.g. http://10.0.0.1:18080 (default: the config's); "
        f"the token then comes from {TOKEN_VAR}, or the config.",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")
]


@dataclass(frozen=True)
class Target:
    """Where the manager's API is, and its token (with where it came from, for messages)."""

    url: str  # ends in /api/v1
    token: str
    token_from: str

    def __repr__(self) -> str:  # never the token
        return f"Target(url={self.url!r}, token_from={self.token_from!r})"


def find_target(env: str | None, config: Path | None, root: Path | None, url: str | None) -> Target:
    """The manager's API and token, from --url/AYS_TOKEN or the manager's config."""
    token = os.environ.get(TOKEN_VAR, "").strip()
    if url is not None:
        base = _api_base(url)
        if token:
            return Target(base, token, TOKEN_VAR)
    try:
        cfg = choose_config(env, config, root)
        if url is None:
            ip = cfg.manager.ip
            ip = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(ip, ip)
            host = f"[{ip}]" if ":" in ip else ip
            base = f"http://{host}:{cfg.manager.port}{API}"
        if token:
            return Target(base, token, TOKEN_VAR)
        return Target(base, resolve_access_token(cfg, generate=False), f"env {cfg.env}'s config")
    except AysError as err:
        hint = f" (or set {TOKEN_VAR})" if url is not None else ""
        raise fail(f"error: {err}{hint}", EXIT_USAGE) from None


def _api_base(url: str) -> str:
    parsed = httpx.URL(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise fail(f"error: --url {url!r} is not an http(s) URL, e.g. http://10.0.0.1:18080")
    path = parsed.path.rstrip("/")
    if not path.endswith(API):
        path += API
    return str(parsed.copy_with(path=path, query=None, fragment=None))


class ManagerApi:
    """One connection to the manager's API. Each call returns the answer's JSON, or raises
    the typer.Exit of what went wrong (message printed, exit code as above)."""

    def __init__(self, target: Target, timeout: float = TIMEOUT) -> None:
        self.target = target
        try:
            who = f"{getpass.getuser()}@{socket.gethostname()}"
        except (KeyError, OSError):  # no user name for this uid (a container)
            who = socket.gethostname()
        who = who.encode("ascii", "replace").decode()  # a header value
        self.client = httpx.Client(
            base_url=target.url,
            headers={**auth_headers(target.token), ACTOR_HEADER: who},
            timeout=timeout,
        )

    def __enter__(self) -> ManagerApi:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.client.close()

    @property
    def where(self) -> str:
        return self.target.url.removesuffix(API)

    def get(self, path: str, params: Any = None) -> Any:
        return self.call("GET", path, params=params)

    def find(self, path: str, params: Any = None) -> Any:
        """GET `path`; None when it does not exist (404)."""
        response = self.answer("GET", path, params=params)
        if response.status_code == 404:
            return None
        if not response.is_success:
            raise self.refused(response)
        return response.json()

    def post(self, path: str, json: Any = None, params: Any = None) -> Any:
        return self.call("POST", path, json=json, params=params)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.send(method, path, **kwargs)
        return response.json() if response.content else None

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The answer to one request, when it is a success (2xx)."""
        response = self.answer(method, path, **kwargs)
        if response.is_success:
            return response
        raise self.refused(response)

    def answer(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The answer to one request, whatever its status."""
        try:
            return self.client.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise self.unreachable(err) from None

    def refused(self, response: httpx.Response) -> typer.Exit:
        return refusal(response, self.where, self.target.token_from)

    def unreachable(self, err: Exception) -> typer.Exit:
        return fail(
            f"error: cannot reach the manager at {self.where}: {describe(err)}; is it running "
            "(aysManager status), and is this its address (--url, --config, -e, --root)?",
            EXIT_UNREACHABLE,
        )


def describe(err: Exception) -> str:
    return str(err) or type(err).__name__


def refusal(response: httpx.Response, where: str, token_from: str) -> typer.Exit:
    """The message and exit code of an answer that is not a success."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    message = body.get("error") if isinstance(body, dict) else None
    message = message or response.text.strip() or response.reason_phrase
    if status == 401:
        return fail(
            f"error: the manager at {where} refused the access token (from {token_from}); "
            f"use the environment's token ({TOKEN_VAR}, or the config of the manager's env)",
            EXIT_UNREACHABLE,
        )
    if status == 404:
        return fail(f"error: {message}", EXIT_NOT_FOUND)
    if status in (400, 422):
        errors = body.get("errors") if isinstance(body, dict) else None
        lines = [e["error"] for e in errors] if errors else [message]
        return fail("\n".join(f"error: {line}" for line in lines), EXIT_USAGE)
    return fail(f"error: {message}", EXIT_FAILED)
