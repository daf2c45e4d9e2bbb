"""Real Ays daemons as subprocesses for tests: configs, start, wait for health, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

BIN = Path(sys.executable).parent
TOKEN = "t0k3n-for-tests"
# What the manager and nodes present to each other; nodes take nothing else.
CLUSTER_SECRET = "c1uster-secret-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    path: Path,
    storage_url: str,
    manager_port: int,
    data_dir: Path,
    token: str = TOKEN,
    cluster_secret: str = CLUSTER_SECRET,
    **sections: dict[str, Any],
) -> Path:
    """A complete env config (the form installConfig renders) for a test manager/node."""
    config: dict[str, Any] = {
        "env": "dev",
        "access_token": token,
        "cluster_secret": cluster_secret,
        "storage": {"url": storage_url},
        "registry": {"backend": "builtin", "heartbeat_interval": 0.5, "offline_after_missed": 3},
        "transport": {"backend": "builtin", "dispatch_timeout": 3},
        "manager": {
            "ip": "127.0.0.1",
            "port": manager_port,
            "data_dir": str(data_dir / "manager"),
            "reconcile_interval": 1,
        },
        "node": {"ip": "127.0.0.1", "data_dir": str(data_dir / "node"), "kill_grace": 1},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


class Daemon:
    """One `aysManager debug` or `aysNode debug` process, its output kept in a log file."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        health_url: str,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.log_path = log_path
        self.health_url = health_url
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Daemon:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.extra_env},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"{self.args[0]} exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.health_url, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"{self.args[0]} not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if hasattr(self, "_log") and not self._log.closed:
            self._log.close()


def manager(
    config: Path, log_path: Path, port: int, extra_env: dict[str, str] | None = None
) -> Daemon:
    return Daemon(
        [str(BIN / "aysManager"), "debug", "--config", str(config)],
        log_path,
        f"http://127.0.0.1:{port}/api/v1/health",
        extra_env,
    )


def node(
    config: Path, log_path: Path, group: str, port: int, extra_env: dict[str, str] | None = None
) -> Daemon:
    return Daemon(
        [
            str(BIN / "aysNode"),
            "debug",
            "-g",
            group,
            "--config",
            str(config),
            "-p",
            "127.0.0.1",
            "-P",
            str(port),
        ],
        log_path,
        f"http://127.0.0.1:{port}/api/v1/health",
        extra_env,
    )


def client(port: int, token: str = TOKEN) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}/api/v1",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def create_shell_task(port: int, name: str = "tick", schedule: str = "* * * * * *") -> int:
    """A task running `true` on `schedule`, in group g1, made first: the task's id."""
    with client(port) as api:
        assert api.post("/node-groups", json={"name": "g1"}).status_code == 201
        response = api.post(
            "/tasks",
            json={
                "name": name,
                "node_group": "g1",
                "schedule": schedule,
                "task_type": "shell",
                "payload": {"command": "true"},
            },
        )
        assert response.status_code == 201, response.text
        return int(response.json()["id"])


@dataclass
class Cluster:
    """A manager on SQLite in `tmp` and, when asked, one node of group g1."""

    tmp: Path
    config: Path
    manager_port: int
    node_port: int
    manager: Daemon
    node: Daemon | None = None

    def api(self) -> httpx.Client:
        return client(self.manager_port)


C = TypeVar("C", bound=Cluster)


@contextmanager
def cluster(
    tmp: Path, kind: type[C], with_node: bool = True, **sections: dict[str, Any]
) -> Iterator[C]:
    """Start a manager (and a node of group g1, online) for the block; kill them after.
    `kind` is Cluster, or a subclass of it with helpers of a test module's own; `sections`
    change the config (e.g. metrics={"public": True})."""
    from ays_runtime.storage.migrate import upgrade

    url = f"sqlite:///{tmp / 'ays.db'}"
    upgrade(url)
    manager_port, node_port = free_port(), free_port()
    config = write_config(tmp / "ays.yaml", url, manager_port, tmp, **sections)
    ays = kind(tmp, config, manager_port, node_port, manager(config, tmp / "m.log", manager_port))
    try:
        ays.manager.start()
        if with_node:
            with ays.api() as api:
                assert api.post("/node-groups", json={"name": "g1"}).status_code == 201
            ays.node = node(config, tmp / "node.log", "g1", node_port).start()

            def online() -> bool:
                with ays.api() as api:
                    return api.get("/nodes", params={"status": "online"}).json()["total"] == 1

            wait_for(online, 45, "the node online")
        yield ays
    finally:
        if ays.node is not None:
            ays.node.kill()
        ays.manager.kill()


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `predicate` until it returns something truthy, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def assert_each_outage_logged_once(log: str, down: str, back: str) -> None:
    """An outage is logged when it begins and when it ends, not at each failed attempt: the
    log's `down` and `back` lines alternate, starting with `down` and ending with `back`. A
    loaded machine may really see two outages (a send that times out just after the server
    came back), so the test checks the alternation, not a count of lines."""
    events = [
        "down" if down in line else "back"
        for line in log.splitlines()
        if down in line or back in line
    ]
    assert events and events[0] == "down" and events[-1] == "back", (events, log)
    repeated = [i for i, (a, b) in enumerate(zip(events, events[1:], strict=False)) if a == b]
    assert not repeated, f"an outage logged more than once: {events}\n{log}"
