"""The quick start, as a new user runs it: `scripts/dev` in a fresh clone of this commit.

The clone uses this test run's virtualenv (AYS_VENV, as the README documents) rather than
creating its own: a first run's virtualenv takes a minute and is measured by hand (README).
Ctrl-C is what a terminal sends: SIGINT to the whole foreground process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.daemons import free_port

pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parent.parent
FIRST_LINE_TIMEOUT = 120  # a loaded 2-core machine: start both daemons, join, fire, run


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("quickstart") / "ays"
    subprocess.run(
        ["git", "clone", "--quiet", str(CHECKOUT), str(target)],
        check=True,
        timeout=120,
        capture_output=True,
    )
    return target


class Dev:
    """One `scripts/dev` run, its stdout (the job log) and stderr read as they come."""

    def __init__(self, clone: Path, manager_port: int, node_port: int) -> None:
        self.clone = clone
        env = {**os.environ, **dev_env(manager_port, node_port)}
        self.proc = subprocess.Popen(
            ["scripts/dev"],
            cwd=clone,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: object, lines: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.append(line.rstrip("\n"))

    def said(self) -> str:
        return "\n".join(self.err + self.out)

    def first_run_line(self) -> str:
        deadline = time.monotonic() + FIRST_LINE_TIMEOUT
        while time.monotonic() < deadline:
            runs = [line for line in self.out if line.startswith("run ")]
            if runs:
                return runs[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no job-log line from scripts/dev:\n{self.said()}")

    def ctrl_c(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(90)
        finally:  # a Ctrl-C that did not end it fails the test, and leaves nothing open
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            for reader in self._readers:
                reader.join(10)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


def processes_of(clone: Path) -> list[str]:
    """Processes still running anything of the clone (its daemons name its run/ config)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(clone) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{proc.pid}: {cmdline}")
    return found


@pytest.fixture
def ports(clone: Path) -> Iterator[tuple[int, int]]:
    yield free_port(), free_port()
    for proc in psutil.process_iter(["cmdline"]):  # whatever a failed test left behind
        if str(clone) in " ".join(proc.info["cmdline"] or []):
            proc.kill()


def test_the_quick_start_shows_a_success_first_and_leaves_no_process_after_ctrl_c(
    clone: Path, ports: tuple[int, int]
) -> None:
    """The manager's port taken first: scripts/dev names it and the variable that moves it
    at once; the command it proposes then runs the quick start, twice (the second start finds
    the task, the database and the node's row of the first)."""
    manager_port, node_port = ports
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", manager_port))
        holder.listen()
        refused = subprocess.run(
            ["scripts/dev"],
            cwd=clone,
            env={**os.environ, **dev_env(manager_port, node_port)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert refused.returncode == 1 and refused.stdout == ""
    said = refused.stderr.splitlines()
    assert said[0] == (
        f"scripts/dev: port {manager_port} (the manager's) is taken on 127.0.0.1 by another "
        "program;"
    ), refused.stderr
    assert said[1].startswith("scripts/dev: choose another with AYS_MANAGER_PORT, e.g. one free ")
    assert len(said) == 2, refused.stderr  # nothing else: no poll, no curl, no old log lines
    variable, value = said[1].split("e.g. one free now: ", 1)[1].split()[0].split("=")
    assert (variable, said[1].endswith(f"{variable}={value} scripts/dev")) == (
        "AYS_MANAGER_PORT",
        True,
    )

    for start in ("first", "second"):
        dev = Dev(clone, int(value), node_port)
        try:
            line = dev.first_run_line()
        finally:
            code = dev.ctrl_c()
        assert ": succeeded exit=0;" in line, f"{start} start:\n{dev.said()}"
        assert "; output: hello from " in line
        assert code in (0, 130), dev.said()
        assert "scripts/dev: stopped" in dev.said()
        assert "Traceback" not in dev.said()
        assert not processes_of(clone), f"{start} start left processes"
        if start == "first":
            assert "created the sample task 'hello'" in dev.said()


def dev_env(manager_port: int, node_port: int) -> dict[str, str]:
    return {
        "AYS_MANAGER_PORT": str(manager_port),
        "AYS_NODE_PORT": str(node_port),
        "AYS_VENV": sys.prefix,
    }
