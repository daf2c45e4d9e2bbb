"""A bounded property-based run (schemathesis, every check) over the manager's and the node's
APIs, as real processes: no server error, no answer that departs from the OpenAPI document.

Bounded: a fixed number of examples per operation, derandomised, so the same cases run every
time in a few minutes (tests/fuzz/schemathesis.toml). The daemons run behind a proxy that does
not exist (nothing generated leaves the machine: not a heartbeat's made-up address, not a
made-up URL) and every run sent to the node is made harmless first (tests/fuzz/hooks.py).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.daemons import (
    BIN,
    CLUSTER_SECRET,
    TOKEN,
    Daemon,
    client,
    free_port,
    manager,
    node,
    write_config,
)

FUZZ = Path(__file__).parent / "fuzz"
NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing listens
FENCED = {
    "HTTP_PROXY": NOWHERE,
    "HTTPS_PROXY": NOWHERE,
    "ALL_PROXY": NOWHERE,
    "NO_PROXY": "127.0.0.1,localhost",
}

pytestmark = pytest.mark.slow


@contextmanager
def fenced_daemons(tmp: Path, url: str) -> Iterator[tuple[Daemon, int, Daemon, int]]:
    """A manager on `url` and a node, both fenced off from the network."""
    manager_port, node_port = free_port(), free_port()
    config = write_config(tmp / "ays.yaml", url, manager_port, tmp)
    the_manager = manager(config, tmp / "manager.log", manager_port, FENCED).start()
    # An empty PATH: even a command that slipped past the hooks finds no program to run.
    empty = tmp / "no-programs"
    empty.mkdir()
    the_node = None
    try:
        with client(manager_port) as api:
            assert api.post("/node-groups", json={"name": "g1"}).status_code == 201
        the_node = node(config, tmp / "node.log", "g1", node_port, {**FENCED, "PATH": str(empty)})
        the_node.start()
        yield the_manager, manager_port, the_node, node_port
    finally:
        if the_node is not None:
            the_node.stop()
        the_manager.stop()


def schemathesis_run(
    port: int, manager_port: int, report: Path
) -> subprocess.CompletedProcess[str]:
    # A node takes only the cluster secret; the manager, the access token (an admin).
    token = TOKEN if port == manager_port else CLUSTER_SECRET
    return subprocess.run(
        [
            str(BIN / "schemathesis"),
            "--config-file",
            str(FUZZ / "schemathesis.toml"),
            "run",
            f"http://127.0.0.1:{port}/openapi.json",
            "--header",
            f"Authorization: Bearer {token}",
            "--workers",
            "1",
            "--checks",
            "all",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={
            **FENCED,
            "PATH": str(BIN),
            "HOME": str(report),
            "SCHEMATHESIS_HOOKS": "tests.fuzz.hooks",
            "PYTHONPATH": str(FUZZ.parent.parent),
            "AYS_FUZZ_MANAGER_URL": f"http://127.0.0.1:{manager_port}",
        },
        cwd=report,
    )


def check_run(daemon: Daemon, port: int, manager_port: int, tmp: Path) -> None:
    run = schemathesis_run(port, manager_port, tmp)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-20000:]
    assert " passed" in output, output[-3000:]
    assert "Traceback" not in daemon.log(), daemon.log()[-5000:]


def test_a_bounded_schemathesis_run_over_the_manager_api_finds_nothing(
    tmp_path: Path, database_url: str
) -> None:
    """On SQLite and on MariaDB, whose strict mode refuses what SQLite stores."""
    with fenced_daemons(tmp_path, database_url) as (the_manager, manager_port, _, _):
        check_run(the_manager, manager_port, manager_port, tmp_path)


def test_a_bounded_schemathesis_run_over_the_node_api_finds_nothing(
    tmp_path: Path, sqlite_url: str
) -> None:
    with fenced_daemons(tmp_path, sqlite_url) as (_, manager_port, the_node, node_port):
        check_run(the_node, node_port, manager_port, tmp_path)
