"""The checks STYLE.md asks for, run with the suite so that CI enforces them: ruff (lint and
format) over the whole tree, mypy over the two packages (settings in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def check(*command: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}{done.stderr}"


def test_ruff_finds_nothing_to_complain_about() -> None:
    check("ruff", "check", "--no-cache", ".")


def test_every_python_file_is_formatted_as_ruff_formats_it() -> None:
    check("ruff", "format", "--check", "--no-cache", ".")


def test_mypy_finds_no_type_error_in_the_packages() -> None:
    check("mypy", "--no-incremental", "--cache-dir", "/dev/null")
