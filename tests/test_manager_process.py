"""The manager as a real process: `aysManager debug`, `reconcile --dry-run`, two managers."""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, select

from ays_runtime.storage.models import JobLog, TriggerKind
from tests.daemons import (
    BIN,
    client,
    create_shell_task,
    free_port,
    manager,
    wait_for,
    write_config,
)


def job_slots(url: str, task_id: int) -> list[tuple[object, str]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [
                (r.scheduled_at, r.manager_id)
                for r in conn.execute(
                    select(JobLog.scheduled_at, JobLog.manager_id).where(
                        JobLog.task_id == task_id,
                        JobLog.attempt == 0,
                        JobLog.trigger == TriggerKind.CRON.value,
                    )
                )
            ]
    finally:
        engine.dispose()


def test_the_debug_manager_fires_a_new_task_at_once_and_stops_cleanly_on_sigint(
    tmp_path: Path, sqlite_url: str
) -> None:
    port = free_port()
    config = write_config(tmp_path / "manager.yaml", sqlite_url, port, tmp_path)
    daemon = manager(config, tmp_path / "manager.log", port).start()
    try:
        task = create_shell_task(port)
        with client(port) as api:
            triggered = api.post(f"/tasks/{task}/trigger", json={"params": "now"})
            assert triggered.status_code == 202, triggered.text
            manual = api.get(f"/job-logs/{triggered.json()['job_log_id']}").json()
            assert manual["trigger"] == "manual" and manual["params"] == "now"
        slots = wait_for(lambda: len(job_slots(sqlite_url, task)) >= 2, 10, "two cron fires")
        assert slots
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()
    assert "stopped" in daemon.log()


def test_two_managers_on_one_database_fire_each_slot_exactly_once(
    tmp_path: Path, mysql_url: str
) -> None:
    ports = [free_port(), free_port()]
    daemons = []
    for i, port in enumerate(ports):
        config = write_config(tmp_path / f"m{i}.yaml", mysql_url, port, tmp_path / f"m{i}")
        daemons.append(manager(config, tmp_path / f"m{i}.log", port).start())
    try:
        task = create_shell_task(ports[0])
        # The second manager learns of the task at its next reconcile tick (1 s).
        wait_for(lambda: len(job_slots(mysql_url, task)) >= 6, 20, "six fires")
        time.sleep(1.0)
    finally:
        codes = [d.stop() for d in daemons]
    assert codes == [0, 0], [d.log() for d in daemons]
    slots = job_slots(mysql_url, task)
    per_slot = Counter(slot for slot, _ in slots)
    assert per_slot and max(per_slot.values()) == 1
    ordered = sorted(per_slot)
    gaps = [(b - a).total_seconds() for a, b in zip(ordered, ordered[1:], strict=False)]  # type: ignore[operator]
    assert set(gaps) == {1.0}, gaps  # every second fired, none twice
    claimers = Counter(m for _, m in slots)
    assert set(claimers) <= {f"127.0.0.1:{p}" for p in ports}


def test_a_manager_outside_dev_refuses_to_start_without_an_access_token(
    tmp_path: Path, sqlite_url: str
) -> None:
    port = free_port()
    config = write_config(tmp_path / "m.yaml", sqlite_url, port, tmp_path, token="")
    data = yaml.safe_load(config.read_text())
    data["env"] = "uat"
    config.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [BIN / "aysManager", "debug", "--config", config],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "access_token is empty" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_dev_manager_generates_its_token_once_and_keeps_it_private(
    tmp_path: Path, sqlite_url: str
) -> None:
    port = free_port()
    config = write_config(tmp_path / "m.yaml", sqlite_url, port, tmp_path, token="")
    daemon = manager(config, tmp_path / "m.log", port).start()
    daemon.stop()
    token_file = tmp_path / "manager" / "access_token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token not in daemon.log()
    assert str(token_file) in daemon.log()
    for line in daemon.log().splitlines():  # every line, the first one included, is dated
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", line), line
    assert f"manager 127.0.0.1:{port}: generated the dev access token" in daemon.log()
    daemon = manager(config, tmp_path / "m2.log", port).start()
    try:
        with client(port, token) as api:
            assert api.get("/tasks").status_code == 200
    finally:
        daemon.stop()
    assert token_file.read_text().strip() == token


def test_a_manager_whose_port_is_taken_says_so(tmp_path: Path, sqlite_url: str) -> None:
    port = free_port()
    config = write_config(tmp_path / "m.yaml", sqlite_url, port, tmp_path)
    daemon = manager(config, tmp_path / "m.log", port).start()
    try:
        result = subprocess.run(
            [BIN / "aysManager", "debug", "--config", config],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        daemon.stop()
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_reconcile_dry_run_prints_one_line_per_action_and_changes_nothing(
    tmp_path: Path, sqlite_url: str
) -> None:
    port = free_port()
    config = write_config(tmp_path / "m.yaml", sqlite_url, port, tmp_path)
    daemon = manager(config, tmp_path / "m.log", port).start()
    try:
        task = create_shell_task(port)
        with client(port) as api:
            api.post(
                "/tasks",
                json={
                    "name": "hourly",
                    "node_group": "g1",
                    "schedule": "0 0 * * * *",
                    "task_type": "shell",
                    "payload": {"command": "true"},
                    "enabled": False,
                },
            )
    finally:
        daemon.stop()
    engine = create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE ays_task SET version = version + 1, enabled = 1")
    engine.dispose()
    run = [BIN / "aysManager", "reconcile", "--dry-run", "--config", config]
    first = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert any(line.startswith("update") and f"task {task}:" in line for line in lines)
    assert any(line.startswith("add") for line in lines)
    assert lines[-1].endswith("2 action(s); nothing was changed")
    second = subprocess.run(run, capture_output=True, text=True, timeout=60)

    def actions(out: str) -> list[str]:
        return [line.split(", next ")[0] for line in out.splitlines()]

    assert actions(second.stdout) == actions(first.stdout)  # the dry run changed nothing


@pytest.mark.parametrize("bad", [["-p", "999.1.1.1"], ["-P", "70000"]])
def test_a_bad_listen_address_is_refused_with_the_value_shown(
    tmp_path: Path, sqlite_url: str, bad: list[str]
) -> None:
    config = write_config(tmp_path / "m.yaml", sqlite_url, free_port(), tmp_path)
    result = subprocess.run(
        [BIN / "aysManager", "debug", "--config", config, *bad],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert bad[1] in result.stderr
