"""`aysManager install|uninstall`, `aysNode install|uninstall`: Ays as an OS service.

install, one line per step (and "unchanged" for what is already right, so a second run, or
a run from a newer tarball to upgrade, is safe):

    1. the system user the config names (useradd --system), its log and data directories,
       the config file readable by its group (0640)
    2. the program in /opt/ays/<service>/: for a pip/venv install a launcher script that
       execs this Python and this package's entry point; for a PyInstaller bundle a copy of
       the bundle in releases/<version-stamp>/ and a link to it (an upgrade switches the link;
       a running old process keeps its own files until it has handed over)
    3. templates/systemd/ rendered (Jinja2, StrictUndefined): the systemd unit and the LSB init
       script for hosts without systemd
    4. enabled at boot: systemctl enable where systemd runs, update-rc.d or chkconfig otherwise

Without root it refuses, unless `--root DIR` stages everything under DIR (no user, no
ownership, nothing enabled). It refuses when the config installConfig renders is missing,
naming the installConfig command.

uninstall stops the service, disables it and removes what install put in place: program,
unit, init script and the run directory (pidfile, reload record). The config, data and logs
stay, unless --purge: then they go, with the manager's Consul watch file installConfig
rendered beside its config (only if it still is that file), and the system user too, if no
other Ays service uses it.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2
import typer

from ays_installer.consul_watch import WATCH_FILE, is_rendered_watch
from ays_installer.layout import Installation, installconfig_command
from ays_installer.render import write_atomic
from ays_installer.resources import env_name, known_envs, templates_dir
from ays_runtime import __version__
from ays_runtime.config import EnvConfig
from ays_runtime.exceptions import ConfigError, ServiceError
from ays_runtime.node.daemon import DRAIN_TIMEOUT, FLUSH_TIMEOUT, KILL_WAIT, SERVER_STOP_TIMEOUT
from ays_runtime.service import systemd
from ays_runtime.service.layout import DIR_MODE, SERVICE_NAMES, ServiceFiles

UNIT_MODE = 0o644
SCRIPT_MODE = 0o755
# systemd's stop timeout: the manager's shutdown is time-boxed well within a minute; the
# node's drain, kill, result flush and server stop must fit in it.
STOP_TIMEOUT = {
    "manager": 60,
    "node": int(DRAIN_TIMEOUT + KILL_WAIT + FLUSH_TIMEOUT + SERVER_STOP_TIMEOUT) + 30,
}
DESCRIPTIONS = {"manager": "Ays scheduling center", "node": "Ays executor node"}
ENTRY_POINTS = {"manager": "manager_main", "node": "node_main"}
NOLOGIN = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")
# Characters a path in a unit or script may not hold (systemd splits on whitespace).
_UNSAFE_IN_UNITS = set(" \t\n\r\"'\\")


@dataclass(frozen=True)
class Wanted:
    """What the command line asked for, checked against the rendered config."""

    env: str | None
    ip: str | None
    port: int | None
    group: str | None = None


def say(message: str) -> None:
    typer.echo(message)


# --- install -------------------------------------------------------------------------------


def install(inst: Installation, wanted: Wanted) -> None:
    if not inst.staged and os.geteuid() != 0:
        raise ServiceError(
            f"installing the {inst.service} service needs root: run it with sudo, or stage it "
            "with --root DIR"
        )
    config = _rendered_config(inst, wanted)
    files = inst.files(config)
    section = files.section
    for path in (inst.program, inst.config_path, Path(section.data_dir), Path(section.log_dir)):
        _check_unit_safe(path)
    total = 4
    say(f"[1/{total}] user and directories")
    _user_and_dirs(inst, files)
    say(f"[2/{total}] program")
    _install_program(inst)
    say(f"[3/{total}] service files")
    unit, script = render_service_files(inst, config)
    _write(inst.unit_path, unit, UNIT_MODE)
    _write(inst.init_script, script, SCRIPT_MODE)
    say(f"[4/{total}] enable at boot")
    _enable(inst)
    if inst.staged:
        how = f"{inst.program} start --root {inst.root}"
    else:
        how = f"service {inst.service} start"
    say(f"installed {inst.service} (Ays {__version__}); start it with: {how}")


def _rendered_config(inst: Installation, wanted: Wanted) -> EnvConfig:
    def command(env: str | None, rendered: EnvConfig | None = None) -> str:
        """The installConfig command that renders what the command line asks for: every
        option it needs, from the command line, else the `rendered` config, else a
        placeholder (ENV, GROUP, IP, PORT) that only the operator can fill in."""
        section = None
        if rendered is not None:
            section = rendered.manager if inst.role == "manager" else rendered.node
        ip = wanted.ip or (section.ip if section else "IP")
        port = wanted.port or (section.port if section else "PORT")
        extra = f"-p {ip} -P {port}"
        if inst.role == "node":
            group = wanted.group or (rendered.node.group if rendered else None)
            extra = f"-g {group or 'GROUP'} {extra}"
        line = installconfig_command(inst.role, env or "ENV", inst.root, extra)
        if env is None:
            line += f" (ENV: one of {', '.join(known_envs(inst.root))})"
        return line

    if not inst.config_path.is_file():
        raise ConfigError(
            f"{inst.config_path}: no such file: the {inst.role}'s config is rendered by "
            f"installConfig; run first: {command(wanted.env)}"
        )
    config = inst.load_config()
    section = config.manager if inst.role == "manager" else config.node
    differences = []
    if wanted.ip is not None and wanted.ip != section.ip:
        differences.append(f"-p {wanted.ip} but {inst.role}.ip is {section.ip}")
    if wanted.port is not None and wanted.port != section.port:
        differences.append(f"-P {wanted.port} but {inst.role}.port is {section.port}")
    if inst.role == "node" and wanted.group and config.node.group not in (None, wanted.group):
        differences.append(f"-g {wanted.group} but node.group is {config.node.group}")
    if inst.role == "node" and not config.node.group:
        differences.append("node.group is not set")
    if wanted.env is not None and env_name(Path(wanted.env)) != config.env:
        differences.append(f"-e {wanted.env} but it was rendered for env {config.env}")
    if differences:
        again = command(wanted.env or config.env, config)
        raise ConfigError(
            f"{inst.config_path}: {'; '.join(differences)}; render it again with: {again}"
        )
    return config


def _check_unit_safe(path: Path) -> None:
    if _UNSAFE_IN_UNITS & set(str(path)):
        raise ConfigError(
            f"{path}: a path in a systemd unit may not hold whitespace, quotes or backslashes; "
            "choose another directory"
        )


def _user_and_dirs(inst: Installation, files: ServiceFiles) -> None:
    section = files.section
    user = section.user
    data_dir, log_dir = Path(section.data_dir), Path(section.log_dir)
    if inst.staged:
        say(f"  user {user}: not created (staged under --root)")
    else:
        _ensure_user(user, data_dir)
    for directory in (log_dir, data_dir, files.run_dir):
        if directory.is_dir():
            say(f"  unchanged {directory}")
        else:
            directory.mkdir(mode=DIR_MODE, parents=True)
            say(f"  created {directory}")
    if inst.staged:
        return
    account = pwd.getpwnam(user)
    uid, gid = account.pw_uid, account.pw_gid
    for directory in (log_dir, data_dir):
        # The service writes there: the directories and what is in them become its own
        # (a `debug` run as root may have left root's files behind).
        _chown_tree(directory, uid, gid, recursive=directory == data_dir)
    for log in log_dir.glob(f"{files.service}.log*"):
        os.chown(log, uid, gid)
    os.chown(inst.config_path, 0, gid)
    os.chmod(inst.config_path, 0o640)
    say(f"  {data_dir}, {log_dir}: owned by {user}; {inst.config_path}: root:{user} 0640")


def _ensure_user(user: str, home: Path) -> None:
    try:
        pwd.getpwnam(user)
        say(f"  unchanged user {user}")
        return
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise ServiceError(f"there is no user {user!r} and no useradd to create it; create it")
    shell = next((s for s in NOLOGIN if os.path.exists(s)), "/bin/false")
    _run(
        [
            useradd,
            "--system",
            "--user-group",
            "--home-dir",
            str(home),
            "--no-create-home",
            "--shell",
            shell,
            "--comment",
            "Ays services",
            user,
        ]
    )
    say(f"  created system user {user}")


def _chown_tree(top: Path, uid: int, gid: int, recursive: bool) -> None:
    os.chown(top, uid, gid)
    if not recursive:
        return
    for folder, dirs, names in os.walk(top):
        for name in dirs + names:
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)


# --- the program ---------------------------------------------------------------------------


def _install_program(inst: Installation) -> None:
    inst.install_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    if getattr(sys, "frozen", False):
        _install_bundle(inst)
    else:
        _write(inst.program, launcher_text(inst), SCRIPT_MODE)


def launcher_text(inst: Installation) -> str:
    """A launcher for a pip/venv install: this interpreter, this package's entry point.
    AYS_PROGRAM names the launcher, which a reload runs again (a new version once the
    environment is upgraded)."""
    entry = ENTRY_POINTS[inst.role]
    code = f"from ays_installer.cli import {entry}; {entry}()"
    return (
        "#!/bin/sh\n"
        f"# {inst.program_name}: Ays, installed by `{inst.program_name} install` from the Python\n"
        f"# environment of {sys.executable}.\n"
        f"# Upgrade: install the new version into that environment, then `{inst.program_name}\n"
        "# reload` (no interruption) or `restart`.\n"
        f"AYS_PROGRAM={shlex.quote(str(inst.program))}\n"
        "export AYS_PROGRAM\n"
        f'exec {shlex.quote(sys.executable)} -P -c {shlex.quote(code)} "$@"\n'
    )


def _install_bundle(inst: Installation) -> None:
    """Copy the PyInstaller bundle this program runs from into releases/<stamp>/ and point
    the program link at it; keep the previous release (a running process still uses it)."""
    executable = Path(sys.executable).resolve()  # the bootloader itself, not a link to it
    source = executable.parent
    releases = inst.install_dir / "releases"
    releases.mkdir(mode=0o755, exist_ok=True)
    stamp = f"{__version__}-{time.strftime('%Y%m%d%H%M%S')}"
    target = releases / stamp
    previous = _link_target(inst.program)
    count = sum(len(names) for _, _, names in os.walk(source))
    say(f"  copying the program bundle {source} ({count} files) to {target}")
    temporary = releases / f".{stamp}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(source, temporary, symlinks=True)
    os.replace(temporary, target)
    # The link keeps the program's name: the multicall bundle dispatches on it.
    link = inst.install_dir / f".{inst.program_name}.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(Path("releases") / stamp / executable.name)
    os.replace(link, inst.program)
    say(f"  {inst.program} -> {target / executable.name}")
    keep = {target.name} | ({previous.parts[1]} if previous and len(previous.parts) > 1 else set())
    for old in releases.iterdir():
        if old.name not in keep and not old.name.startswith("."):
            shutil.rmtree(old)
            say(f"  removed the old release {old}")


def _link_target(path: Path) -> Path | None:
    try:
        return Path(os.readlink(path))
    except OSError:
        return None


# --- the unit and the init script ----------------------------------------------------------


def render_service_files(inst: Installation, config: EnvConfig) -> tuple[str, str]:
    """(systemd unit, LSB init script) for the role, from templates/systemd/."""
    files = inst.files(config)
    section = files.section
    lifecycle_args = ["--config", str(inst.config_path)]
    if inst.root is not None:
        lifecycle_args = ["--root", str(inst.root), *lifecycle_args]
    context = {
        "service": inst.service,
        "role": inst.role,
        "description": DESCRIPTIONS[inst.role],
        "program_name": inst.program_name,
        "version": __version__,
        "env": config.env,
        "address": f"{section.ip}:{section.port}",
        "port": section.port,
        "privileged_port": section.port < 1024,
        "group": config.node.group if inst.role == "node" else None,
        "program": str(inst.program),
        "config": str(inst.config_path),
        "user": section.user,
        "data_dir": section.data_dir,
        "log_dir": section.log_dir,
        "log_file": str(files.log_file),
        "pidfile": str(files.pidfile),
        "stop_timeout": STOP_TIMEOUT[inst.role],
        "lifecycle_args": " ".join(shlex.quote(a) for a in lifecycle_args),
    }
    return (
        _render(f"{inst.service}.service.j2", context),
        _render("ays.init.j2", context),
    )


def _render(name: str, context: dict[str, object]) -> str:
    folder = templates_dir() / "systemd"
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        undefined=jinja2.StrictUndefined,  # a missing value is an error, never ""
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(exec_arg=_exec_arg, path_arg=_path_arg, sh=shlex.quote)
    try:
        return environment.get_template(name).render(context)
    except jinja2.TemplateNotFound:
        raise ConfigError(f"{folder / name}: no such template") from None
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"{folder / name}: line {err.lineno}: {err.message}") from None
    except jinja2.TemplateError as err:
        raise ConfigError(f"{folder / name}: {err.message}") from None


def _path_arg(value: object) -> str:
    """A path in a unit setting: % starts a specifier, so it is doubled."""
    text = str(value)
    if _UNSAFE_IN_UNITS & set(text):
        raise ConfigError(f"{text!r}: cannot be written into a systemd unit")
    return text.replace("%", "%%")


def _exec_arg(value: object) -> str:
    """A word of an Exec*= command line: specifiers (%) and variables ($) escaped."""
    return _path_arg(value).replace("$", "$$")


# --- enable and disable ---------------------------------------------------------------------


def _uses_systemd() -> bool:
    return systemd.booted() and shutil.which("systemctl") is not None


def _enable(inst: Installation) -> None:
    if inst.staged:
        say("  not enabled: staged under --root")
        return
    if _uses_systemd():
        _run(["systemctl", "daemon-reload"])
        _run(["systemctl", "enable", f"{inst.service}.service"])
        say(f"  systemctl enable {inst.service}")
    elif shutil.which("update-rc.d"):
        _run(["update-rc.d", inst.service, "defaults"])
        say(f"  update-rc.d {inst.service} defaults")
    elif shutil.which("chkconfig"):
        _run(["chkconfig", "--add", inst.service])
        say(f"  chkconfig --add {inst.service}")
    else:
        say(
            f"  note: no systemctl, update-rc.d or chkconfig here: {inst.init_script} is not "
            "started at boot; link it into your runlevels by hand"
        )


def _disable(inst: Installation) -> None:
    if inst.staged:
        return
    if _uses_systemd():
        if inst.unit_path.exists():
            _run(["systemctl", "disable", f"{inst.service}.service"])
            say(f"  systemctl disable {inst.service}")
    elif shutil.which("update-rc.d"):
        _run(["update-rc.d", "-f", inst.service, "remove"])
        say(f"  update-rc.d -f {inst.service} remove")
    elif shutil.which("chkconfig") and inst.init_script.exists():
        _run(["chkconfig", "--del", inst.service])
        say(f"  chkconfig --del {inst.service}")


# --- uninstall ------------------------------------------------------------------------------


def uninstall(inst: Installation, purge: bool) -> None:
    from ays_installer.lifecycle import Lifecycle

    if not inst.staged and os.geteuid() != 0:
        raise ServiceError(
            f"uninstalling the {inst.service} service needs root: run it with sudo, or give "
            "--root DIR for a staged install"
        )
    config = inst.load_config() if inst.config_path.is_file() else None
    if not inst.installed and not purge:
        say(
            f"{inst.service} is not installed here ({inst.unit_path}, {inst.init_script} and "
            f"{inst.program} are absent): nothing to remove"
        )
        return
    if config is not None:
        Lifecycle(inst, config).stop_if_running()
    _disable(inst)
    for path in (inst.unit_path, inst.init_script, inst.install_dir):
        _remove(path)
        _remove_empty_parents(inst, path)
    if not inst.staged and _uses_systemd():
        _run(["systemctl", "daemon-reload"])
    if config is not None:
        _remove(inst.files(config).run_dir)
    if not purge:
        kept = f"{inst.config_path}" if config is None else _kept(inst, config)
        say(f"uninstalled {inst.service}; kept {kept} (uninstall --purge removes them)")
        return
    _purge(inst, config)


def _kept(inst: Installation, config: EnvConfig) -> str:
    section = inst.files(config).section
    watch = _watch_file(inst, config)
    also = f", {watch}" if watch is not None and watch.is_file() else ""
    return f"{inst.config_path}{also}, {section.data_dir} and the logs in {section.log_dir}"


def _watch_file(inst: Installation, config: EnvConfig) -> Path | None:
    """Where installConfig renders the manager's Consul watch (consul envs); None for a
    node: the watch is the manager's, even when both share one conf_dir."""
    if inst.role != "manager":
        return None
    return Path(config.manager.conf_dir) / WATCH_FILE


def _purge(inst: Installation, config: EnvConfig | None) -> None:
    _remove(inst.config_path)
    if config is None:
        say(
            f"note: {inst.config_path} was missing, so its data and log directories are unknown "
            "and were left alone"
        )
        return
    files = inst.files(config)
    section = files.section
    _remove(Path(section.data_dir))
    for log in sorted(Path(section.log_dir).glob(f"{files.service}.log*")):
        _remove(log)
    watch = _watch_file(inst, config)
    if watch is not None:
        _remove_watch(watch)
    for directory in (Path(section.log_dir), Path(section.conf_dir)):
        _remove_if_empty(directory)
    other = next(r for r in SERVICE_NAMES if r != inst.role)
    other_installed = Installation(other, inst.root, inst.config_path).installed
    if inst.staged:
        say(f"purged {inst.service}")
        return
    if other_installed:
        say(f"purged {inst.service}; user {section.user} stays ({SERVICE_NAMES[other]} uses it)")
        return
    try:
        pwd.getpwnam(section.user)
    except KeyError:
        say(f"purged {inst.service}")
        return
    if shutil.which("userdel"):
        _run(["userdel", section.user])
        say(f"  removed user {section.user}")
    say(f"purged {inst.service}")


def _remove_watch(path: Path) -> None:
    """Remove the Consul watch file at `path` if it is the one installConfig rendered; a
    file an operator put or edited there stays, and the output says so."""
    if not path.is_symlink() and not path.exists():
        return
    keep = (
        f"  kept {path}: not the Consul watch installConfig renders; remove it by hand if it "
        "is no longer needed"
    )
    if path.is_symlink() or not path.is_file():
        say(keep)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        say(f"  kept {path}: cannot read it: {err.strerror or err}")
        return
    except UnicodeDecodeError:
        say(keep)
        return
    if not is_rendered_watch(text):
        say(keep)
        return
    _remove(path)


# --- small helpers --------------------------------------------------------------------------


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        changed = write_atomic(path, text, mode)
    except OSError as err:
        raise ServiceError(f"{path}: cannot write: {err.strerror or err}") from None
    say(f"  {'wrote' if changed else 'unchanged'} {path}")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        return
    say(f"  removed {path}")


def _remove_empty_parents(inst: Installation, path: Path) -> None:
    """/opt/ays when it is left empty; under --root also the folders install staged
    (etc/systemd/system, etc/init.d, opt), up to the root itself."""
    if not inst.staged:
        _remove_if_empty(inst.install_dir.parent)
        return
    assert inst.root is not None
    top = inst.root.absolute()
    parent = path.parent
    while parent != top and top in parent.parents:
        if parent.exists():  # a purge of what was never installed has nothing here
            if any(parent.iterdir()):
                return
            _remove_if_empty(parent)
        parent = parent.parent


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        return
    say(f"  removed {path} (empty)")


def _run(command: list[str]) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as err:
        raise ServiceError(f"cannot run {command[0]}: {err.strerror}") from None
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise ServiceError(f"`{' '.join(command)}` failed ({result.returncode}): {output}")
