"""Files written without systemd get the modes they get with it (the units say UMask=0027):
directories 0750; the database with its -wal and -shm, the logs and the node's result spool
0640; whatever the umask of the shell that started the program.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from typer.testing import CliRunner

from ays_installer.install_config import app as install_config
from tests.daemons import BIN, TOKEN, free_port, manager, wait_for, write_config


def mode(path: Path) -> str:
    return f"{stat.S_IMODE(path.stat().st_mode):04o}"


@contextmanager
def shell_umask(value: int) -> Iterator[None]:
    """The umask an operator's shell has (children started meanwhile inherit it)."""
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def run(*args: str | Path) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=150, check=False
    )
    assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    return done.stdout


def test_a_service_started_without_systemd_writes_its_files_with_the_services_modes(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    manager_port, node_port = free_port(), free_port()
    data = {"manager": root / "var/lib/ays", "node": root / "var/lib/ays-node"}
    logs = root / "var/log/ays"
    conf = root / "etc/ays"
    conf.mkdir(parents=True)

    def dirs(role: str) -> dict[str, str]:
        return {"conf_dir": str(conf), "log_dir": str(logs), "data_dir": str(data[role])}

    for role in ("manager", "node"):
        write_config(
            conf / f"{role}.yaml",
            f"sqlite:///{data['manager'] / 'ays.db'}",
            manager_port,
            tmp_path / "unused",
            manager=dirs("manager"),
            node={**dirs("node"), "group": "g1", "port": node_port},
        )
    programs = {"manager": BIN / "aysManager", "node": BIN / "aysNode"}
    started: list[str] = []
    try:
        with shell_umask(0o022):
            for role in ("manager", "node"):
                run(programs[role], "start", "--config", conf / f"{role}.yaml")
                started.append(role)
        database = data["manager"] / "ays.db"
        files = [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
        files += [logs / "aysmanager.log", logs / "aysnode.log"]
        assert {str(p): mode(p) for p in files} == {str(p): "0640" for p in files}
        # A result the node cannot deliver stays in its spool: its run goes on while the
        # (only) manager stops.
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{manager_port}/api/v1",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        with api:
            wait_for(
                lambda: api.get("/nodes", params={"status": "online"}).json()["total"] == 1,
                60,
                "the node online",
            )
            body = {
                "name": "slow",
                "node_group": "g1",
                "schedule": "0 0 0 1 1 *",
                "payload": {"command": "sleep 3"},
            }
            task = api.post("/tasks", json=body).json()["id"]
            run_id = api.post(f"/tasks/{task}/trigger").json()["job_log_id"]
            wait_for(
                lambda: api.get(f"/job-logs/{run_id}").json()["status"] == "running",
                60,
                "the run started",
            )
        run(programs["manager"], "stop", "--config", conf / "manager.yaml")
        started.remove("manager")
        spooled = data["node"] / "results" / f"{run_id}.json"
        wait_for(spooled.exists, 60, "the undeliverable result in the spool")
        assert mode(spooled) == "0640"
        directories = [data["manager"], data["node"], data["node"] / "results", logs]
        assert {str(p): mode(p) for p in directories} == {str(p): "0750" for p in directories}
    finally:
        for role in reversed(started):
            run(programs[role], "stop", "--config", conf / f"{role}.yaml")


def test_a_manager_in_the_foreground_and_db_upgrade_create_the_database_0640(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "ays.yaml", "sqlite:///{data_dir}/ays.db", port, tmp_path / "debug"
    )
    with shell_umask(0o022):
        daemon = manager(config, tmp_path / "manager.log", port).start()
    try:
        database = tmp_path / "debug/manager/ays.db"
        assert (mode(database.parent), mode(database)) == ("0750", "0640")
    finally:
        daemon.stop()
    upgraded = write_config(
        tmp_path / "up.yaml", f"sqlite:///{tmp_path / 'up/ays.db'}", port, tmp_path / "up"
    )
    with shell_umask(0o022):
        run(BIN / "aysManager", "db", "upgrade", "--config", upgraded)
    assert (mode(tmp_path / "up"), mode(tmp_path / "up/ays.db")) == ("0750", "0640")


def test_installconfig_creates_the_conf_log_and_data_dirs_0750(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    with shell_umask(0o022):
        done = CliRunner().invoke(install_config, ["manager", "-e", "dev", "--root", str(stage)])
    assert done.exit_code == 0, done.output
    dirs = [stage / "etc/ays", stage / "var/log/ays", stage / "var/lib/ays"]
    assert {str(d): mode(d) for d in dirs} == {str(d): "0750" for d in dirs}
