"""An API write that meets a transient database error is tried again, not refused.

A real manager on MariaDB whose connections wait 1 s for a row lock (`init_command` in its
storage URL, as an operator could set it); a rival transaction holds the row the write needs
until the manager has logged its first retry, then lets go. The write must then succeed:
before the one retry policy covered the API's sessions, it answered 503.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import text

from ays_runtime.storage.database import make_engine
from tests.daemons import (
    Daemon,
    client,
    create_shell_task,
    free_port,
    manager,
    wait_for,
    write_config,
)

IMPATIENT = "SET SESSION innodb_lock_wait_timeout = 1"


@pytest.fixture
def impatient_manager(tmp_path: Path, mysql_url: str) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    sep = "&" if "?" in mysql_url else "?"
    url = f"{mysql_url}{sep}init_command={quote(IMPATIENT)}"
    config = write_config(tmp_path / "manager.yaml", url, port, tmp_path)
    daemon = manager(config, tmp_path / "manager.log", port).start()
    try:
        yield daemon, port
    finally:
        daemon.stop()


@contextmanager
def rival_holding(mysql_url: str, table: str, row_id: int) -> Iterator[None]:
    """A transaction of another connection holds `table`'s row `row_id` while the block runs."""
    engine = make_engine(mysql_url)
    try:
        with engine.connect() as conn:
            conn.execute(text(f"SELECT id FROM {table} WHERE id = :id FOR UPDATE"), {"id": row_id})
            try:
                yield
            finally:
                conn.rollback()
    finally:
        engine.dispose()


def change_while_held(
    daemon: Daemon, port: int, mysql_url: str, table: str, row_id: int, path: str, body: Any
) -> httpx.Response:
    """PATCH `path` while a rival holds the row; the rival lets go once the manager retried."""
    answers: list[httpx.Response | BaseException] = []

    def send() -> None:
        try:
            with client(port) as api:
                answers.append(api.patch(path, json=body, timeout=120))
        except BaseException as err:  # reported below
            answers.append(err)

    with rival_holding(mysql_url, table, row_id):
        sender = threading.Thread(target=send)
        sender.start()
        wait_for(
            lambda: answers or "trying again" in daemon.log(),
            120,
            "the manager retrying the write the rival holds up",
        )
    sender.join(120)
    assert answers and isinstance(answers[0], httpx.Response), answers
    return answers[0]


def test_a_task_change_held_up_by_a_row_lock_is_tried_again_and_stored(
    impatient_manager: tuple[Daemon, int], mysql_url: str
) -> None:
    daemon, port = impatient_manager
    # Fires once a year: no run gets in the way.
    task_id = create_shell_task(port, "yearly", "0 0 1 1 *")
    answer = change_while_held(
        daemon, port, mysql_url, "ays_task", task_id, f"/tasks/{task_id}", {"schedule": "0 1 1 1 *"}
    )
    assert answer.status_code == 200, answer.text
    assert "Lock wait timeout" in daemon.log()
    with client(port) as api:
        assert api.get(f"/tasks/{task_id}").json()["schedule"] == "0 1 1 1 *"
        versions = api.get(f"/tasks/{task_id}/versions").json()
    assert versions["total"] == 2  # stored once: the retry did not write it twice


def test_a_workflow_change_held_up_by_a_row_lock_is_tried_again_and_stored(
    impatient_manager: tuple[Daemon, int], mysql_url: str
) -> None:
    daemon, port = impatient_manager
    create_shell_task(port, "step", "0 0 1 1 *")
    with client(port) as api:
        flow = api.post("/workflows", json={"name": "etl", "tasks": ["step"]})
        assert flow.status_code == 201, flow.text
    answer = change_while_held(
        daemon,
        port,
        mysql_url,
        "ays_workflow",
        flow.json()["id"],
        "/workflows/etl",
        {"description": "nightly"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["description"] == "nightly"
