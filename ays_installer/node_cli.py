"""`aysNode`: the executor node's commands."""

from __future__ import annotations

import typer

from ays_installer.options import (
    ConfigOption,
    DebugLoggerOption,
    EnvOption,
    GroupOption,
    IpOption,
    PortOption,
    RootOption,
    choose_config,
    clean_errors,
    fail,
)
from ays_installer.service_cli import add_service_commands
from ays_installer.version import add_version_option
from ays_runtime.config import EnvConfig

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help and one-line errors, as all three programs
    help="Ays executor node: run it, as a service or in the foreground.",
)
add_version_option(app, "aysNode")


@app.command()
@clean_errors
def debug(
    group: GroupOption = None,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    ip: IpOption = None,
    port: PortOption = None,
    debug_logger: DebugLoggerOption = None,
) -> None:
    """Run the node in the foreground, logging debug.

    Ctrl-C stops it: running jobs get the drain time to end; a second Ctrl-C kills them."""
    from ays_runtime.logs import configure_logging
    from ays_runtime.node.daemon import run_node
    from ays_runtime.service.layout import service_umask

    cfg = with_node_address(
        choose_config(env, config, root, role="node"), group=group, ip=ip, port=port
    )
    service_umask()
    configure_logging(debug=True, debug_loggers=debug_logger or ())
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


add_service_commands(app, "node")  # install, serve, start|stop|status|restart|reload
