"""`installConfig manager|node`: render a role's config file from an env file and install it.

    installConfig manager -e uat -p 172.21.16.81 -P 18080
    installConfig node -e uat -g node_group_ksa --root /tmp/stage --dry-run

Writes `<conf_dir>/ROLE.yaml` (mode 0640; for a manager whose registry is consul, also
`<conf_dir>/consul-watch-ays.json`, the Consul agent watch on the node list) and creates
the role's conf, log and data dirs; prints one line per change ("created DIR", "wrote FILE",
"unchanged FILE") and "nothing changed" when there was nothing to do. `--root DIR` stages
everything under DIR (no root privileges needed); `--dry-run` prints a diff with the secrets
masked and writes nothing.
"""

from __future__ import annotations

import os
import pwd
import shlex
import stat
from pathlib import Path
from typing import Annotated

import typer

from ays_installer.consul_watch import RenderedFile, render_watch_config
from ays_installer.consul_watch import secrets_in as watch_secrets_in
from ays_installer.options import (
    EXIT_FAILURE,
    GroupOption,
    IpOption,
    PortOption,
    clean_errors,
    fail,
    parse_ip,
    parse_port,
)
from ays_installer.preflight import PreflightFailed, needs_preflight, run_preflight
from ays_installer.render import (
    CONFIG_MODE,
    Prepared,
    Role,
    masked_diff,
    prepare,
    read_installed,
    render_config,
    write_atomic,
)
from ays_installer.resources import known_envs
from ays_installer.version import add_version_option
from ays_runtime.config import check_ip
from ays_runtime.exceptions import MissingSecretError
from ays_runtime.service.layout import DIR_MODE

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help and one-line errors, as all three programs
    help="Render a role's config file from an env file and install it.",
)
add_version_option(app, "installConfig")


def _manager_addresses(values: list[str] | None) -> list[str] | None:
    for value in values or []:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise typer.BadParameter(f"{value!r} is not IP:PORT (e.g. 172.21.16.81:18080)")
        parse_ip(host.strip("[]"))
        parse_port(port)
    return values


def _split_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return check_ip(host.strip("[]")), int(port)


ManagerOption = Annotated[
    list[str] | None,
    typer.Option(
        "-m",
        "--manager",
        callback=_manager_addresses,
        metavar="IP:PORT",
        help="Where the node reaches the manager (default: the env's manager.ip:port). Give "
        "it once per manager to name several (node.managers): the node beats and reports to "
        "any of them that answers.",
    ),
]
EnvOption = Annotated[
    str | None,
    typer.Option("-e", "--env", metavar="ENV", help="The environment to render, a file in envs/."),
]
RootOption = Annotated[
    Path | None,
    typer.Option(
        "--root",
        file_okay=False,
        metavar="DIR",
        help="Stage the files under DIR instead of / (no root privileges needed).",
    ),
]
DryRunOption = Annotated[
    bool,
    typer.Option("--dry-run", help="Print what would change (secrets masked) and write nothing."),
]
SkipPreflightOption = Annotated[
    bool,
    typer.Option(
        "--skip-preflight",
        help="Do not check the RocketMQ proxy and its topics (staging on a host without network).",
    ),
]


@app.command("manager")
@clean_errors
def manager(
    env: EnvOption = None,
    ip: IpOption = None,
    port: PortOption = None,
    root: RootOption = None,
    dry_run: DryRunOption = False,
    skip_preflight: SkipPreflightOption = False,
) -> None:
    """Render and install the scheduling center's config, manager.yaml."""
    install(
        "manager", env, ip=ip, port=port, root=root, dry_run=dry_run, preflight=not skip_preflight
    )


@app.command("node")
@clean_errors
def node(
    env: EnvOption = None,
    ip: IpOption = None,
    port: PortOption = None,
    group: GroupOption = None,
    manager: ManagerOption = None,
    root: RootOption = None,
    dry_run: DryRunOption = False,
    skip_preflight: SkipPreflightOption = False,
) -> None:
    """Render and install an executor node's config, node.yaml."""
    addresses = [_split_address(m) for m in manager] if manager else None
    install(
        "node",
        env,
        ip=ip,
        port=port,
        group=group,
        managers=addresses,
        root=root,
        dry_run=dry_run,
        preflight=not skip_preflight,
    )


def install(
    role: Role,
    env: str | None,
    *,
    ip: str | None = None,
    port: int | None = None,
    group: str | None = None,
    managers: list[tuple[str, int]] | None = None,
    root: Path | None = None,
    dry_run: bool = False,
    preflight: bool = True,
) -> None:
    """Everything is checked and rendered before the first directory or file is touched."""
    if env is None:
        known = ", ".join(known_envs(root)) or "(none)"
        raise fail(f"error: name the environment with -e ENV: known environments are {known}")
    try:
        prepared = prepare(env, role, ip=ip, port=port, group=group, root=root, managers=managers)
    except MissingSecretError as err:
        if "SUDO_USER" in os.environ:
            raise MissingSecretError(
                f"{err} (sudo drops environment variables: pass them with "
                f"sudo --preserve-env={','.join(err.names)} installConfig ...)",
                err.names,
            ) from None
        raise
    if role == "node" and not prepared.config.node.group:
        node_settings = prepared.config.node
        again = ["installConfig", "node", "-e", env, "-g", "GROUP"]
        again += ["-p", node_settings.ip, "-P", str(node_settings.port)]
        for manager_ip, manager_port in managers or []:
            host = f"[{manager_ip}]" if ":" in manager_ip else manager_ip
            again += ["-m", f"{host}:{manager_port}"]
        if root is not None:
            again += ["--root", str(root)]
        again += ["--dry-run"] if dry_run else []
        again += [] if preflight else ["--skip-preflight"]
        raise fail(
            f"error: {prepared.source} sets no node.group: give the node group this executor "
            f"joins with -g; run: {shlex.join(again)} (GROUP: e.g. node_group_ksa; a group "
            "that does not exist yet is created when the node joins)"
        )
    if root is None and os.geteuid() != 0:
        raise fail(
            f"installConfig: writing to {prepared.section.conf_dir} needs root; "
            f"run it with sudo, or stage it with --root DIR"
        )
    files = [
        RenderedFile(prepared.path, render_config(prepared), prepared.secrets),
        *render_watch_config(prepared),  # consul envs: the agent's watch on the node list
    ]
    if preflight and needs_preflight(prepared):  # rocketmq envs: proxy reachable, topics exist
        try:
            run_preflight(prepared, typer.echo)
        except PreflightFailed as err:
            raise fail(f"error: {err}", EXIT_FAILURE) from None
    if dry_run:
        _show_changes(prepared, files)
    else:
        _apply(prepared, files, staged=root is not None)


def _apply(prepared: Prepared, files: list[RenderedFile], *, staged: bool) -> None:
    changed = False
    for directory in prepared.dirs:
        if not directory.is_dir():
            try:
                directory.mkdir(mode=DIR_MODE, parents=True)
            except OSError as err:
                raise _io_failure("cannot create", directory, err) from None
            typer.echo(f"created {directory}")
            changed = True
    gid = None if staged else _service_gid(prepared)
    for file in files:
        try:
            written = write_atomic(file.path, file.text, CONFIG_MODE, gid=gid)
        except OSError as err:
            raise _io_failure("cannot write", file.path, err) from None
        if written:
            typer.echo(f"wrote {file.path}")
            changed = True
        else:
            typer.echo(f"unchanged {file.path}")
    if not changed:
        typer.echo("nothing changed")


def _show_changes(prepared: Prepared, files: list[RenderedFile]) -> None:
    changed = False
    for directory in prepared.dirs:
        if not directory.is_dir():
            typer.echo(f"would create {directory}")
            changed = True
    for file in files:
        path, text = file.path, file.text
        try:
            old = read_installed(path)
        except OSError as err:
            raise _io_failure("cannot read", path, err) from None
        if old != text:
            secrets = prepared.secrets | file.secrets | watch_secrets_in(old)
            typer.echo(masked_diff(old or "", text, path, secrets), nl=False)
            changed = True
        elif (mode := stat.S_IMODE(path.stat().st_mode)) != CONFIG_MODE:
            typer.echo(f"would set mode {CONFIG_MODE:04o} on {path} (now {mode:04o})")
            changed = True
        else:
            typer.echo(f"unchanged {path}")
    if not changed:
        typer.echo("nothing would change")


def _service_gid(prepared: Prepared) -> int | None:
    """The primary group of the user the role's service runs as, which must read the file."""
    user = prepared.section.user
    try:
        return pwd.getpwnam(user).pw_gid
    except KeyError:
        typer.echo(
            f"note: there is no user {user!r} yet, so {prepared.path} stays readable by root "
            f"only; run installConfig again once the user exists"
        )
        return None


def _io_failure(what: str, path: Path, err: OSError) -> typer.Exit:
    return fail(f"error: {path}: {what}: {err.strerror or err}", EXIT_FAILURE)
