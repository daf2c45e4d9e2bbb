"""The checks STYLE.md asks for, run with the suite so that CI enforces them: ruff (lint and
format) over the whole tree, mypy over the two packages (settings in pyproject.toml), and the
layering the packages' contracts promise."""

from __future__ import annotations

import ast
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


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (under TYPE_CHECKING and in functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_transport_module_imports_the_manager() -> None:
    # A transport only hands runs over and says what became of them; routing, shards and the
    # job log's states are the manager's dispatcher's (ays_runtime/manager/dispatch.py).
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m
            for m in imported_modules(path)
            if m == "ays_runtime.manager" or m.startswith("ays_runtime.manager.")
        )
        for path in sorted((ROOT / "ays_runtime" / "transport").glob("*.py"))
    }
    assert not {path: mods for path, mods in offenders.items() if mods}
