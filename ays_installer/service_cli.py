"""The service commands both programs share, added to `aysManager` and `aysNode`:

    install [-p IP -P PORT] [-g GROUP] [-e ENV] [--root DIR]     (services.py)
    uninstall [--purge]
    serve                                   the daemon in the foreground, as a service runs it
    start | stop | status | restart | reload                     (lifecycle.py)

Every one of them finds the role's config the way installConfig wrote it: `--config FILE`,
or `<conf_dir>/<role>.yaml` of env `-e ENV` (default dev), under `--root DIR` when given.
Failures exit with the LSB codes: 1 failed, 4 needs root, 6 not configured, 7 not running.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer

from ays_installer.layout import Installation
from ays_installer.lifecycle import (
    EXIT_FAILED,
    EXIT_NO_PRIVILEGE,
    EXIT_NOT_CONFIGURED,
    STATUS_UNKNOWN,
    STOP_TIMEOUT,
    Lifecycle,
)
from ays_installer.options import (
    ConfigOption,
    EnvOption,
    GroupOption,
    IpOption,
    PortOption,
    RootOption,
    fail,
)
from ays_runtime.exceptions import AysError, ConfigError
from ays_runtime.service.layout import Role

P = ParamSpec("P")
R = TypeVar("R")

TimeoutOption = Annotated[
    float,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        min=1,
        help="How long to wait for the stop before SIGKILL.",
    ),
]


def lsb_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Our errors become one line on stderr and an LSB exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            raise fail(f"error: {err}", EXIT_NOT_CONFIGURED) from None
        except AysError as err:
            raise fail(f"error: {err}", EXIT_FAILED) from None

    return wrapper


def add_service_commands(app: typer.Typer, role: Role) -> None:
    """Add install, uninstall, serve, start, stop, status, restart and reload to `app`."""

    def located(env: str | None, config: Path | None, root: Path | None) -> Installation:
        return Installation.locate(role, env, config, root)

    def lifecycle(env: str | None, config: Path | None, root: Path | None) -> Lifecycle:
        inst = located(env, config, root)
        return Lifecycle(inst, inst.load_config())

    def need_root(inst: Installation, doing: str) -> None:
        if not inst.staged and os.geteuid() != 0:
            raise fail(
                f"error: {doing} the {inst.service} service needs root: run it with sudo, or "
                "stage it with --root DIR",
                EXIT_NO_PRIVILEGE,
            )

    if role == "manager":

        @app.command("install")
        @lsb_errors
        def install_manager(
            ip: IpOption = None,
            port: PortOption = None,
            env: EnvOption = None,
            root: RootOption = None,
        ) -> None:
            """Install the scheduling center as a service.

            Renders the systemd unit and the init script, creates the user and the
            directories, and enables the service; installConfig manager comes first."""
            from ays_installer.services import Wanted
            from ays_installer.services import install as run_install

            inst = located(env, None, root)
            need_root(inst, "installing")
            run_install(inst, Wanted(env, ip, port))

    else:

        @app.command("install")
        @lsb_errors
        def install_node(
            group: GroupOption = None,
            ip: IpOption = None,
            port: PortOption = None,
            env: EnvOption = None,
            root: RootOption = None,
        ) -> None:
            """Install this executor node as a service.

            Renders the systemd unit and the init script, creates the user and the
            directories, and enables the service; installConfig node comes first."""
            from ays_installer.services import Wanted
            from ays_installer.services import install as run_install

            inst = located(env, None, root)
            need_root(inst, "installing")
            run_install(inst, Wanted(env, ip, port, group))

    @app.command()
    @lsb_errors
    def uninstall(
        purge: Annotated[
            bool,
            typer.Option(
                "--purge",
                help="Also remove the config (and the manager's Consul watch), the data, the "
                "logs and the user.",
            ),
        ] = False,
        env: EnvOption = None,
        config: ConfigOption = None,
        root: RootOption = None,
    ) -> None:
        """Stop and remove the service.

        The config, the data and the logs stay, unless --purge."""
        from ays_installer.services import uninstall as run_uninstall

        inst = located(env, config, root)
        need_root(inst, "uninstalling")
        run_uninstall(inst, purge)

    @app.command()
    @lsb_errors
    def serve(env: EnvOption = None, config: ConfigOption = None, root: RootOption = None) -> None:
        """Run in the foreground as the service does.

        This is what the unit and `start` run: info logging to stderr and the log file, a
        pidfile; SIGHUP reloads without interruption, SIGTERM stops."""
        from ays_runtime.service.runner import run_service

        inst = located(env, config, root)
        raise typer.Exit(run_service(role, inst.load_config()))

    @app.command()
    @lsb_errors
    def start(env: EnvOption = None, config: ConfigOption = None, root: RootOption = None) -> None:
        """Start the service and wait until it serves.

        Through systemctl where systemd runs the installed unit, else under own supervision."""
        raise typer.Exit(lifecycle(env, config, root).start())

    @app.command()
    @lsb_errors
    def stop(
        timeout: TimeoutOption = STOP_TIMEOUT,
        env: EnvOption = None,
        config: ConfigOption = None,
        root: RootOption = None,
    ) -> None:
        """Stop the service (running work gets its drain time)."""
        raise typer.Exit(lifecycle(env, config, root).stop(timeout))

    @app.command()
    @lsb_errors
    def restart(
        timeout: TimeoutOption = STOP_TIMEOUT,
        env: EnvOption = None,
        config: ConfigOption = None,
        root: RootOption = None,
    ) -> None:
        """Stop, then start the service.

        Reload does it without interrupting service."""
        raise typer.Exit(lifecycle(env, config, root).restart(timeout))

    @app.command()
    @lsb_errors
    def reload(
        wait: Annotated[
            bool,
            typer.Option("--wait/--no-wait", help="Wait for the new process to take over."),
        ] = True,
        pid: Annotated[
            int | None,
            typer.Option(
                "--pid",
                metavar="PID",
                help="Reload this process (the unit's ExecReload passes $MAINPID).",
            ),
        ] = None,
        env: EnvOption = None,
        config: ConfigOption = None,
        root: RootOption = None,
    ) -> None:
        """Restart without interrupting service, also after an upgrade.

        The program as it is on disk now takes over the listening socket; the old process
        finishes its work and exits. Fails, leaving the old process serving, when the new
        one does not start."""
        raise typer.Exit(lifecycle(env, config, root).reload(pid, wait))

    @app.command()
    def status(env: EnvOption = None, config: ConfigOption = None, root: RootOption = None) -> None:
        """Show the service's state, pid, health and version.

        Also its uptime, memory, CPU and address.

        Exit code (LSB): 0 running, 1 dead but the pidfile is left, 3 not running,
        4 unknown."""
        try:
            code = lifecycle(env, config, root).status()
        except AysError as err:
            raise fail(f"error: {err}", STATUS_UNKNOWN) from None
        raise typer.Exit(code)
