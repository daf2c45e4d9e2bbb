"""What every command shares: its options (help texts are full sentences; a flag that takes a
value names it: ENV, FILE, DIR, IP, PORT, GROUP), choosing the config (-e ENV | --config FILE
| --root DIR), clean failure."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer

from ays_installer.layout import DEFAULT_ENV, Installation
from ays_installer.resources import load_env
from ays_runtime.config import EnvConfig, check_ip, check_port, load_config_file
from ays_runtime.exceptions import AysError
from ays_runtime.service.layout import Role

P = ParamSpec("P")
R = TypeVar("R")

EXIT_USAGE = 2  # bad input: the message says what to fix
EXIT_FAILURE = 1

EnvOption = Annotated[
    str | None,
    typer.Option(
        "-e", "--env", metavar="ENV", help="The environment, a file in envs/ (default: dev)."
    ),
]
# The manager's rule for node group names (a Consul tag, part of a RocketMQ topic).
GROUP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def parse_ip(value: str) -> str:
    try:
        return check_ip(value)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def parse_port(value: str) -> int:
    try:
        return check_port(int(value))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a port number (1-65535)") from None


def check_group(value: str | None) -> str | None:
    if value is not None and not GROUP_NAME.match(value):
        raise typer.BadParameter(
            f"{value!r} is not a node group name: 1-64 letters, digits, '_' or '-' "
            "(e.g. -g node_group_ksa)"
        )
    return value


IpOption = Annotated[
    str | None,
    typer.Option(
        "-p", "--ip", parser=parse_ip, metavar="IP", help="The address to listen on and advertise."
    ),
]
PortOption = Annotated[
    int | None,
    typer.Option(
        "-P", "--port", parser=parse_port, metavar="PORT", help="The TCP port to listen on."
    ),
]
GroupOption = Annotated[
    str | None,
    typer.Option(
        "-g", "--group", callback=check_group, metavar="GROUP", help="The node group to join."
    ),
]
DebugLoggerOption = Annotated[
    list[str] | None,
    typer.Option(
        "--debug-logger",
        metavar="NAME",
        help="Also show this library's DEBUG lines (e.g. grpc, httpx, sqlalchemy.engine; "
        "all: every library); repeatable. Without it, libraries log at INFO and above.",
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        dir_okay=False,
        help="The config file to read (default: the one installConfig rendered for -e ENV, "
        "under --root DIR when given).",
    ),
]
RootOption = Annotated[
    Path | None,
    typer.Option(
        "--root",
        metavar="DIR",
        file_okay=False,
        help="A staged install under DIR (installConfig --root DIR): read its config. Its "
        "services run under own supervision, never systemctl, and need no root privileges.",
    ),
]


AGO = re.compile(r"^(\d+)([smhd])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_moment(value: str, option: str) -> str:
    """`--since 2h` (ago), or a date and time (this host's time zone unless it names one),
    as the API takes it."""
    match = AGO.match(value.strip())
    if match:
        ago = timedelta(**{UNITS[match.group(2)]: int(match.group(1))})
        return (datetime.now(UTC) - ago).isoformat()
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise fail(
            f"error: {option} {value!r} is neither a time ago (30s, 15m, 2h, 7d) nor a date "
            "and time (2026-11-25 14:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # this host's time zone
    return moment.isoformat()


SinceOption = Annotated[
    str | None,
    typer.Option(
        "--since",
        metavar="WHEN",
        parser=lambda value: parse_moment(value, "--since"),
        help="Only those since WHEN: a time ago (30s, 15m, 2h, 7d) or a date and time "
        "(this host's time zone unless it names one).",
    ),
]
LimitOption = Annotated[
    int,
    typer.Option("-n", "--limit", metavar="N", min=1, max=1000, help="How many, newest first."),
]


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print `message` to stderr and return the Exit to raise."""
    typer.echo(message, err=True)
    return typer.Exit(code)


def clean_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn our own errors into a message on stderr and exit 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except AysError as err:
            raise fail(f"error: {err}") from None

    return wrapper


def choose_config(
    env: str | None,
    config: Path | None,
    root: Path | None = None,
    role: Role = "manager",
) -> EnvConfig:
    """The config a command reads: `--config FILE`; else the one installConfig rendered for
    the role (`<conf_dir>/<role>.yaml` of env -e ENV, under `--root DIR`), as the service
    commands find it; else, with no --root and nothing rendered, the env file itself
    (envs/ENV.yaml, default dev)."""
    if env and config:
        raise fail("error: give either -e ENV or --config FILE, not both")
    if config is not None:
        return load_config_file(config)
    installed = Installation.locate(role, env, None, root)
    if root is not None or installed.config_path.is_file():
        return installed.load_config()
    return load_env(env or DEFAULT_ENV)


def echo_err(message: str) -> None:
    print(message, file=sys.stderr)
