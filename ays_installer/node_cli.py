"""`aysNode`: the executor node's commands."""

from __future__ import annotations

import logging
import re
import sys
from typing import Annotated

import typer

from ays_installer.options import ConfigOption, EnvOption, choose_config, clean_errors, fail
from ays_runtime.config import EnvConfig, check_ip, check_port

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain one-line errors, as installConfig: operators grep them
    help="Ays executor node.",
)

# The manager's rule for node group names (a Consul tag, part of a RocketMQ topic).
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"
# Libraries that log every request (heartbeats would drown the node's own lines), and
# uvicorn's start/stop notes, which the node says itself with its address in front.
_CHATTY = ("httpx", "httpcore", "asyncio", "uvicorn.error")


def _ip(value: str) -> str:
    try:
        return check_ip(value)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _port(value: str) -> int:
    try:
        return check_port(int(value))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a port number (1-65535)") from None


def _group(value: str | None) -> str | None:
    if value is not None and not _GROUP_NAME.match(value):
        raise typer.BadParameter(
            f"{value!r} is not a node group name: 1-64 letters, digits, '_' or '-' "
            "(e.g. -g node_group_ksa)"
        )
    return value


IpOption = Annotated[
    str | None,
    typer.Option("-p", "--ip", parser=_ip, help="address to listen on and advertise (node.ip)"),
]
PortOption = Annotated[
    int | None, typer.Option("-P", "--port", parser=_port, help="TCP port (node.port)")
]
GroupOption = Annotated[
    str | None,
    typer.Option("-g", "--group", callback=_group, help="node group to join (default: node.group)"),
]


@app.command()
def version() -> None:
    """Print the version."""
    from ays_runtime import __version__

    typer.echo(__version__)


@app.command()
@clean_errors
def debug(
    group: GroupOption = None,
    env: EnvOption = None,
    config: ConfigOption = None,
    ip: IpOption = None,
    port: PortOption = None,
) -> None:
    """Run the node in the foreground with debug logging (Ctrl-C stops it: running jobs
    get the drain time to end; a second Ctrl-C kills them)."""
    from ays_runtime.node.daemon import run_node

    cfg = with_node_address(choose_config(env, config), group=group, ip=ip, port=port)
    _debug_logging()
    raise typer.Exit(run_node(cfg))


def with_node_address(
    config: EnvConfig, *, group: str | None, ip: str | None, port: int | None
) -> EnvConfig:
    """`config` with the command line's -g/-p/-P in its node section. A node group must come
    from one or the other."""
    changes = {k: v for k, v in {"group": group, "ip": ip, "port": port}.items() if v is not None}
    node = config.node.model_copy(update=changes)
    if not node.group:
        raise fail(
            "error: no node group: give -g GROUP (e.g. -g node_group_ksa), or set node.group "
            "in the config"
        )
    return config.model_copy(update={"node": node})


def _debug_logging() -> None:
    logging.basicConfig(level=logging.DEBUG, format=_LOG_FORMAT, stream=sys.stderr, force=True)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
