"""What the three programs have in common, tried as a new user would: `--version`, one plain
help style (no `<bool>` after a flag, every help text a sentence), and `--root` on the
commands that read the installed config."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from ays_installer.install_config import app as install_config_app
from ays_installer.manager_cli import app as manager_app
from ays_installer.node_cli import app as node_app
from tests.daemons import Daemon, free_port, wait_for
from tests.test_cli import cli_env

BIN = Path(sys.executable).parent
PROGRAMS = {"installConfig": install_config_app, "aysManager": manager_app, "aysNode": node_app}


def run(program: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / program), *args], capture_output=True, text=True, timeout=120, env=cli_env()
    )


@pytest.mark.parametrize("program", list(PROGRAMS))
def test_every_program_tells_its_version_commit_and_python(program: str) -> None:
    done = run(program, "--version")
    assert done.returncode == 0, done.stderr
    name, commit, python = done.stdout.splitlines()
    assert name.startswith(f"{program} 0.")
    assert commit.startswith("commit ") and commit != "commit unknown"
    assert python.startswith(f"python {sys.version_info.major}.{sys.version_info.minor}.")


# Typer builds on its own copy of click: its classes are told apart by what they have.
def commands(group: Any, path: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    yield " ".join(path), group
    for name, command in getattr(group, "commands", {}).items():
        yield from commands(command, (*path, name))


def every_command() -> Iterator[tuple[str, Any]]:
    for program, app in PROGRAMS.items():
        yield from commands(typer.main.get_command(app), (program,))


def sentence(text: str | None) -> bool:
    text = (text or "").strip()
    return bool(text) and (text[0].isupper() or text[0] in "'-@") and text.endswith((".", ".)"))


def test_every_command_and_option_of_the_three_programs_has_a_help_sentence() -> None:
    unclear = []
    checked = 0
    for where, command in every_command():
        checked += 1
        if not sentence(command.help):
            unclear.append(f"{where}: {command.help!r}")
        for param in command.params:
            if param.param_type_name == "option" and not sentence(param.help):
                unclear.append(f"{where} {param.opts[0]}: {param.help!r}")
    assert checked > 40 and unclear == []


def test_the_help_is_plain_and_no_flag_shows_a_value_it_does_not_take() -> None:
    for where, command in every_command():
        program, *_ = where.split()
        root = typer.main.get_command(PROGRAMS[program])
        with root.context_class(root, info_name=program) as ctx:
            text = command.get_help(ctx)
        assert "<bool>" not in text, where
        assert "╭" not in text, where  # Rich's boxes: one plain style in all three
    shown = run("aysManager", "task", "trigger", "--help").stdout
    assert any(line.split()[:2] == ["--wait", "Wait"] for line in shown.splitlines()), shown


def test_the_commands_that_read_the_installed_config_take_root(tmp_path: Path) -> None:
    """A dev install staged with --root: the manager generates its token under the root, and
    logs, node list and task list find it there (without --root they looked in the env file
    and said "start the manager first" while it ran)."""
    root = tmp_path / "stage"
    port = free_port()
    rendered = run("installConfig", "manager", "-e", "dev", "--root", str(root), "-P", str(port))
    assert rendered.returncode == 0, rendered.stderr
    daemon = Daemon(
        [str(BIN / "aysManager"), "debug", "--root", str(root)],
        tmp_path / "manager.log",
        f"http://127.0.0.1:{port}/api/v1/health",
    )
    daemon.start()
    try:
        token = root / "var/lib/ays/access_token"
        wait_for(token.exists, 30, "the generated token")
        for args in (("logs",), ("node", "list"), ("task", "list"), ("run", "list")):
            done = run("aysManager", *args, "--root", str(root))
            assert done.returncode == 0, (args, done.stderr)
        upgraded = run("aysManager", "db", "upgrade", "--root", str(root))
        assert upgraded.returncode == 0 and str(root) in upgraded.stdout
        done = run("aysManager", "reconcile", "--root", str(root))
        assert done.returncode == 0 and f"manager 127.0.0.1:{port}:" in done.stdout
        missing = run("aysManager", "task", "list", "--root", str(tmp_path / "elsewhere"))
        assert missing.returncode == 2
        assert "no such file; render the manager's config first" in missing.stderr
    finally:
        daemon.stop()
