"""`--version` of the three programs: the version, the commit it was built from, the Python.

The commit: a frozen build's VERSION file (next to the program, in its tarball and install
dir), else git when running from a source checkout, else the `+g<commit>` a build stamps into
the version, else unknown.
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

import typer

from ays_runtime import __version__

CHECKOUT = Path(__file__).resolve().parent.parent
STAMPED = re.compile(r"\+g([0-9a-f]{7,40})")


def commit() -> str:
    if getattr(sys, "frozen", False):
        version_file = Path(sys.executable).resolve().parent / "VERSION"
        try:
            for line in version_file.read_text(encoding="utf-8").splitlines():
                if line.startswith("commit "):
                    return line.removeprefix("commit ")
        except OSError:
            pass  # a bundle without its tarball's VERSION: the stamped version says
    elif (CHECKOUT / ".git").exists():
        try:
            done = subprocess.run(
                ["git", "-C", str(CHECKOUT), "describe", "--always", "--dirty", "--abbrev=12"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is not None and done.returncode == 0 and done.stdout.strip():
            return f"{done.stdout.strip()} (source checkout)"
    stamped = STAMPED.search(__version__)
    return stamped.group(1) if stamped else "unknown"


def version_text(program: str) -> str:
    return (
        f"{program} {__version__}\n"
        f"commit {commit()}\n"
        f"python {platform.python_version()} ({platform.python_implementation()})"
    )


def add_version_option(app: typer.Typer, program: str) -> None:
    """`PROGRAM --version` prints the version, the commit and the Python, and exits."""

    def show(value: bool) -> None:
        if value:
            typer.echo(version_text(program))
            raise typer.Exit()

    @app.callback()
    def main(
        version: bool = typer.Option(
            False,
            "--version",
            callback=show,
            is_eager=True,
            help="Print the version, the commit it was built from and the Python, and exit.",
        ),
    ) -> None:
        """Run a command."""
