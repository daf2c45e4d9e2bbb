"""Services: install/uninstall, the lifecycle commands, and reload without interruption.

Everything is staged under tmp_path with --root and runs under own supervision (no systemd
here), with the SQLite dev-style config of tests/daemons.py. The units are checked with
`systemd-analyze verify`, which exits 0 even on a typo such as `Tpye=`: an empty stderr is
required too. Under CI (env var CI set) a missing systemd-analyze fails instead of skipping.
The sd_notify protocol of a reload is checked against a notify socket of our own, with the
sender's pid taken from its credentials, as systemd does for NotifyAccess=main.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, select
from typer.testing import CliRunner

from ays_installer import manager_cli
from ays_installer.consul_watch import WATCH_FILE
from ays_installer.lifecycle import duration
from ays_runtime.service import systemd
from ays_runtime.service.pidfile import Pidfile, process_alive
from ays_runtime.storage.models import JobLog, TriggerKind
from tests.daemons import BIN, client, free_port, wait_for, write_config

MANAGER = str(BIN / "aysManager")
NODE = str(BIN / "aysNode")
INSTALL_CONFIG = str(BIN / "installConfig")
GROUP = "g1"
UAT_SECRETS = {
    "AYS_ACCESS_TOKEN": "tok-uat-access",
    "AYS_CLUSTER_SECRET": "tok-uat-access-cluster",
    "AYS_DB_PASSWORD": "pw-uat-db",
    "AYS_CONSUL_TOKEN": "consul-uat-acl",
    "AYS_ROCKETMQ_SECRET": "rmq-uat-secret",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in {"", "0", "false", "no"}


# --- a staged install -------------------------------------------------------------------------


@dataclass
class Stage:
    """A root with both roles' configs rendered in it, as installConfig --root would."""

    root: Path
    manager_port: int
    node_port: int
    started: set[int] = field(default_factory=set)  # every pid seen, killed at teardown

    @property
    def conf_dir(self) -> Path:
        return self.root / "etc/ays"

    @property
    def log_dir(self) -> Path:
        return self.root / "var/log/ays"

    def data_dir(self, role: str) -> Path:
        return self.root / ("var/lib/ays" if role == "manager" else "var/lib/ays-node")

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.data_dir('manager') / 'ays.db'}"

    def program(self, role: str) -> Path:
        service, name = (
            ("aysmanager", "aysManager") if role == "manager" else ("aysnode", "aysNode")
        )
        return self.root / "opt/ays" / service / name

    def pid(self, role: str) -> int | None:
        service = "aysmanager" if role == "manager" else "aysnode"
        pid = Pidfile(self.data_dir(role) / "run" / f"{service}.pid").running()
        if pid is not None:
            self.started.add(pid)
        return pid

    def health_url(self, role: str) -> str:
        port = self.manager_port if role == "manager" else self.node_port
        return f"http://127.0.0.1:{port}/api/v1/health"


def run(*args: str | Path, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    """One command of the venv's programs (the installer, the lifecycle commands)."""
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"{result.args}: {result.returncode}\n{result.stdout}{result.stderr}"
    )
    return result.stdout


@pytest.fixture
def stage(tmp_path: Path) -> Iterator[Stage]:
    root = tmp_path / "root"
    stage = Stage(root, free_port(), free_port())
    stage.conf_dir.mkdir(parents=True)

    def dirs(role: str) -> dict[str, str]:
        return {
            "conf_dir": str(stage.conf_dir),
            "log_dir": str(stage.log_dir),
            "data_dir": str(stage.data_dir(role)),
        }

    for role in ("manager", "node"):
        write_config(
            stage.conf_dir / f"{role}.yaml",
            stage.database_url,
            stage.manager_port,
            tmp_path / "unused",
            manager=dirs("manager"),
            node={**dirs("node"), "group": GROUP, "port": stage.node_port},
        )
    yield stage
    for role in ("manager", "node"):
        stage.pid(role)
    for pid in stage.started:
        kill_if_ours(pid, stage.root)


def kill_if_ours(pid: int, root: Path) -> None:
    """SIGKILL `pid` if it still is one of this test's daemons: pids are recycled quickly on
    a busy machine, and another test's process must never be hit."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        if str(root) in " ".join(proc.cmdline()):
            proc.kill()


def install(stage: Stage, role: str) -> str:
    if role == "manager":
        args = [MANAGER, "install", "-p", "127.0.0.1", "-P", str(stage.manager_port)]
    else:
        args = [NODE, "install", "-g", GROUP, "-p", "127.0.0.1", "-P", str(stage.node_port)]
    return ok(run(*args, "--root", stage.root))


def render_uat(root: Path, role: str, *more: str) -> None:
    """installConfig ROLE -e uat --root ROOT: uat's registry is consul, so a manager gets
    the Consul watch file beside its config."""
    result = subprocess.run(
        [INSTALL_CONFIG, role, "-e", "uat", *more, "--root", str(root), "--skip-preflight"],
        env={**os.environ, **UAT_SECRETS},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ok(result)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def lifecycle(stage: Stage, role: str, action: str, *more: str) -> subprocess.CompletedProcess[str]:
    """A lifecycle command through the venv's program (the installed one may be replaced)."""
    return run(MANAGER if role == "manager" else NODE, action, "--root", stage.root, *more)


# --- a steady stream of requests --------------------------------------------------------------


class Stream(threading.Thread):
    """GET `url` one request after another until stopped (at most `limit` requests), with
    keep-alive connections or a new connection per request; failures are kept."""

    def __init__(self, url: str, keep_alive: bool, limit: int = 200_000) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.keep_alive = keep_alive
        self.limit = limit
        self.sent = 0
        self.failures: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        headers = {} if self.keep_alive else {"Connection": "close"}
        with httpx.Client(timeout=10, headers=headers) as http:
            while not self._halt.is_set() and self.sent < self.limit:
                self.sent += 1
                try:
                    response = http.get(self.url)
                    if response.status_code != 200:
                        self.failures.append(f"HTTP {response.status_code}: {response.text}")
                except httpx.HTTPError as err:
                    self.failures.append(f"{type(err).__name__}: {err}")
                time.sleep(0.005)

    def finish(self) -> Stream:
        self._halt.set()
        self.join(30)
        return self


def streams(stage: Stage, *roles: str) -> list[Stream]:
    running = [
        Stream(stage.health_url(role), keep_alive) for role in roles for keep_alive in (True, False)
    ]
    for stream in running:
        stream.start()
    return running


def assert_no_failures(running: list[Stream]) -> None:
    for stream in running:
        stream.finish()
    failures = [f"{s.url} keep-alive={s.keep_alive}: {f}" for s in running for f in s.failures]
    assert not failures, f"{len(failures)} failed requests:\n" + "\n".join(failures[:20])
    assert all(s.sent > 20 for s in running), [s.sent for s in running]


def status_of(stage: Stage, role: str) -> tuple[int, str]:
    result = lifecycle(stage, role, "status")
    return result.returncode, result.stdout + result.stderr


def version_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.strip().startswith("version:"))


def set_version(program: Path, version: str) -> None:
    """Replace an installed launcher with a newer program: the same one, stamped `version`."""
    text = program.read_text()
    head, _, rest = text.partition("export AYS_PROGRAM\n")
    program.write_text(
        f"{head}export AYS_PROGRAM\nAYS_VERSION_OVERRIDE={version}\n"
        f"export AYS_VERSION_OVERRIDE\n{rest}"
    )


# --- units -------------------------------------------------------------------------------------


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        message = "systemd-analyze is missing (scripts/test installs it with apt-get)"
        if in_ci():
            pytest.fail(f"{message}; CI is set: the unit checks must run", pytrace=False)
        pytest.skip(message)
    return tool


@pytest.mark.parametrize("role", ["manager", "node"])
def test_the_rendered_units_pass_systemd_analyze_verify_without_a_word(
    stage: Stage, role: str
) -> None:
    tool = systemd_analyze()
    install(stage, role)
    unit = stage.root / f"etc/systemd/system/ays{role}.service"
    result = run(tool, "verify", unit)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    text = unit.read_text()
    assert "Type=notify\n" in text and "NotifyAccess=main\n" in text
    assert f"ExecStart={stage.program(role)} serve --config " in text
    assert f"ExecReload={stage.program(role)} reload --wait --pid $MAINPID --config " in text
    assert "Restart=on-failure\n" in text and "User=ays\n" in text


def test_the_node_units_kill_mode_covers_the_jobs_in_its_control_group(stage: Stage) -> None:
    tool = systemd_analyze()
    install(stage, "node")
    unit = stage.root / "etc/systemd/system/aysnode.service"
    result = run(tool, "verify", unit)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    directives = dict(
        line.split("=", 1)
        for line in unit.read_text().splitlines()
        if "=" in line and line[0] != "#"
    )
    # mixed or control-group: what is left of the group is killed when the main process
    # dies or stops (process or none would leave the jobs running).
    assert directives["KillMode"] in {"mixed", "control-group"}
    assert directives.get("SendSIGKILL", "yes") == "yes"
    assert directives["Restart"] == "on-failure"


def test_verify_reports_a_typo_only_on_stderr_so_the_check_needs_both(tmp_path: Path) -> None:
    tool = systemd_analyze()
    unit = tmp_path / "typo.service"
    unit.write_text("[Service]\nTpye=simple\nExecStart=/bin/true\n")
    result = run(tool, "verify", unit)
    assert result.returncode == 0
    assert "Tpye" in result.stderr


def test_the_manager_unit_is_hardened_and_the_node_unit_says_why_it_is_not(stage: Stage) -> None:
    tool = systemd_analyze()
    install(stage, "manager")
    install(stage, "node")
    manager_unit = stage.root / "etc/systemd/system/aysmanager.service"
    # The threshold is on the 0-100 scale: 30 is an exposure level of 3.0 ("OK").
    result = run(tool, "security", "--offline=true", "--threshold=30", manager_unit)
    assert result.returncode == 0, result.stdout[-600:] + result.stderr
    node_unit = (stage.root / "etc/systemd/system/aysnode.service").read_text()
    assert "NoNewPrivileges" in node_unit and "jobs may use sudo" in node_unit
    assert "NoNewPrivileges=yes" not in node_unit and "ProtectSystem=full" in node_unit


def test_the_init_script_is_thin_and_calls_the_program(stage: Stage) -> None:
    install(stage, "manager")
    script = stage.root / "etc/init.d/aysmanager"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "### BEGIN INIT INFO" in text and "# Provides:          aysmanager" in text
    assert f'exec "$PROGRAM" "$1" --root {stage.root} --config ' in text
    assert ok(run("sh", "-n", script)) == ""
    result = run(script, "status")
    assert result.returncode == 3, result.stdout + result.stderr  # LSB: not running
    assert "not running" in result.stdout


# --- install refusals -------------------------------------------------------------------------


def test_install_refuses_without_root_unless_staged(
    stage: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(manager_cli.app, ["install", "-p", "127.0.0.1", "-P", "18080"])
    assert result.exit_code == 4, result.output
    assert "needs root" in result.output and "sudo" in result.output
    assert "--root DIR" in result.output


def test_install_refuses_when_the_config_is_missing_and_names_the_installconfig_command(
    tmp_path: Path,
) -> None:
    result = run(MANAGER, "install", "-p", "10.0.0.5", "-P", "18080", "--root", tmp_path)
    assert result.returncode == 6, result.stdout + result.stderr
    message = result.stderr
    assert f"{tmp_path}/etc/ays/manager.yaml: no such file" in message
    assert (
        f"installConfig manager -e ENV -p 10.0.0.5 -P 18080 --root {tmp_path} "
        "(ENV: one of dev, prod, uat)" in message
    )
    assert not (tmp_path / "opt").exists() and not (tmp_path / "etc/systemd").exists()
    proposed = message.split("run first: ", 1)[1].split(" (ENV:", 1)[0].split()
    ok(run(str(BIN / proposed[0]), *[a.replace("ENV", "dev") for a in proposed[1:]]))
    ok(run(MANAGER, "install", "-p", "10.0.0.5", "-P", "18080", "--root", tmp_path))


def test_install_refuses_an_address_the_rendered_config_does_not_have(stage: Stage) -> None:
    result = run(NODE, "install", "-g", "other", "-p", "127.0.0.1", "-P", "1", "--root", stage.root)
    assert result.returncode == 6
    assert "-g other but node.group is g1" in result.stderr
    assert f"-P 1 but node.port is {stage.node_port}" in result.stderr
    proposed = result.stderr.split("render it again with: ", 1)[1].split()
    assert proposed == [
        "installConfig",
        "node",
        "-e",
        "dev",
        "-g",
        "other",
        "-p",
        "127.0.0.1",
        "-P",
        "1",
        "--root",
        str(stage.root),
    ]
    ok(run(str(BIN / proposed[0]), *proposed[1:]))
    ok(run(NODE, "install", "-g", "other", "-p", "127.0.0.1", "-P", "1", "--root", stage.root))


def test_installing_twice_changes_nothing(stage: Stage) -> None:
    install(stage, "manager")
    again = install(stage, "manager")
    changes = [line for line in again.splitlines() if line.split()[0] in ("wrote", "created")]
    assert not changes, again
    assert f"unchanged {stage.program('manager')}" in again


# --- status codes -----------------------------------------------------------------------------


def test_status_says_3_when_not_running_and_1_when_a_stale_pidfile_is_left(stage: Stage) -> None:
    install(stage, "node")
    code, text = status_of(stage, "node")
    assert code == 3 and "not running" in text
    gone = subprocess.Popen(["true"])
    gone.wait()
    pidfile = stage.data_dir("node") / "run/aysnode.pid"
    pidfile.write_text(f"{gone.pid}\n")
    code, text = status_of(stage, "node")
    assert code == 1 and "dead, but the pidfile" in text
    assert lifecycle(stage, "node", "stop").returncode == 0  # LSB: stopping a stopped one
    assert not pidfile.exists()


def test_a_pidfile_older_than_its_process_is_stale(tmp_path: Path) -> None:
    """After a reboot the pid may be reused by a process started after the file was written."""
    pidfile = Pidfile(tmp_path / "x.pid")
    pidfile.write(os.getpid())
    assert pidfile.running() == os.getpid()
    os.utime(pidfile.path, (1_000_000, 1_000_000))  # written long before this process began
    assert pidfile.running() is None
    pidfile.create(os.getpid())  # a stale file is replaced
    assert pidfile.running() == os.getpid()


def test_sd_notify_is_one_datagram_to_the_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert systemd.notify("MAINPID=42", "READY=1")
        assert sock.recv(4096) == b"MAINPID=42\nREADY=1"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        name = f"ays-test-{os.getpid()}"
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd.notify("READY=1")


# --- the whole life, without a failed request ---------------------------------------------------


def fired_slots(url: str, task_id: int) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return sorted(
                conn.execute(
                    select(JobLog.scheduled_at).where(
                        JobLog.task_id == task_id,
                        JobLog.attempt == 0,
                        JobLog.trigger.in_((TriggerKind.CRON.value, TriggerKind.MISFIRE.value)),
                    )
                ).scalars()
            )
    finally:
        engine.dispose()


@pytest.mark.slow
def test_install_start_reload_upgrade_stop_uninstall_without_a_failed_request(
    stage: Stage,
) -> None:
    install(stage, "manager")
    install(stage, "node")
    started = ok(lifecycle(stage, "manager", "start"))
    assert f"listening on 127.0.0.1:{stage.manager_port}" in started
    ok(lifecycle(stage, "node", "start"))
    code, text = status_of(stage, "manager")
    assert code == 0, text
    for word in ("running (own supervision)", "pid:", "uptime:", "memory:", "cpu:", "HTTP 200"):
        assert word in text
    assert f"listening: 127.0.0.1:{stage.manager_port} (listening)" in text
    old_version = version_line(text)
    old_pids = {role: stage.pid(role) for role in ("manager", "node")}

    with client(stage.manager_port) as api:
        wait_for(
            lambda: any(n["status"] == "online" for n in api.get("/nodes").json()["items"]),
            30,
            "the node to join",
        )
        assert api.get(f"/node-groups/{GROUP}").json()["auto_created"] is True
        every_second = api.post(
            "/tasks",
            json={
                "name": "tick",
                "node_group": GROUP,
                "schedule": "* * * * * *",
                "task_type": "shell",
                "payload": {"command": "true"},
            },
        ).json()["id"]
        long_job = api.post(
            "/tasks",
            json={
                "name": "long",
                "node_group": GROUP,
                "schedule": "0 0 0 1 1 *",
                "task_type": "shell",
                "payload": {"command": "sleep 10; echo finished-by-the-old-node"},
            },
        ).json()["id"]
        run_id = api.post(f"/tasks/{long_job}/trigger").json()["job_log_id"]
        wait_for(
            lambda: httpx.get(stage.health_url("node")).json()["running_jobs"] >= 1,
            20,
            "the long job to run",
        )

        # reload both while requests stream in and the long job runs on the old node
        running = streams(stage, "manager", "node")
        reloaded = ok(lifecycle(stage, "node", "reload"))
        assert "aysnode reloaded: pid" in reloaded
        ok(lifecycle(stage, "manager", "reload"))
        assert stage.pid("manager") != old_pids["manager"]
        assert stage.pid("node") != old_pids["node"]
        job = wait_for(
            lambda: (
                (r := api.get(f"/job-logs/{run_id}").json())["status"] != "dispatched"
                and r["status"] != "running"
                and r
            ),
            40,
            "the long job's result",
        )
        assert job["status"] == "succeeded", job
        assert "finished-by-the-old-node" in job["output"]
        assert not process_alive(old_pids["node"] or 0) or wait_for(
            lambda: not process_alive(old_pids["node"] or 0), 20, "the old node to exit"
        )

        # upgrade: a newer program in place, reload, status shows it
        for role in ("manager", "node"):
            set_version(stage.program(role), "99.0.0+upgrade")
        pids = {role: stage.pid(role) for role in ("manager", "node")}
        ok(lifecycle(stage, "node", "reload"))
        ok(lifecycle(stage, "manager", "reload"))
        for role in ("manager", "node"):
            code, text = status_of(stage, role)
            assert code == 0, text
            assert "99.0.0+upgrade" in version_line(text), text
            assert stage.pid(role) != pids[role]
        assert "99.0.0+upgrade" not in old_version
        time.sleep(2)  # fires after the last handover
        assert_no_failures(running)

    # every second fired exactly once across the reloads (the slot key forbids doubles)
    slots = fired_slots(stage.database_url, every_second)
    steps = {(b - a).total_seconds() for a, b in zip(slots, slots[1:], strict=False)}
    assert steps == {1.0}, f"gaps or doubles among {len(slots)} fires: {sorted(steps)}"

    for role in ("node", "manager"):
        assert "stopped" in ok(lifecycle(stage, role, "stop"))
        code, text = status_of(stage, role)
        assert code == 3, text
    for role in ("node", "manager"):
        ok(lifecycle(stage, role, "uninstall"))
    left = sorted(p for p in stage.root.rglob("*") if p.is_file())
    allowed = (stage.conf_dir, stage.data_dir("manager"), stage.data_dir("node"), stage.log_dir)
    assert all(any(d in p.parents for d in allowed) for p in left), left
    assert (stage.conf_dir / "manager.yaml").exists() and (
        stage.data_dir("manager") / "ays.db"
    ).exists()
    for gone in ("opt", "etc/systemd", "etc/init.d", "var/lib/ays/run", "var/lib/ays-node/run"):
        assert not (stage.root / gone).exists(), gone


@pytest.mark.slow
def test_a_reload_to_a_broken_program_keeps_the_old_one_serving(
    stage: Stage, tmp_path: Path
) -> None:
    # The Consul watch a consul env's installConfig rendered beside the config (the env has
    # moved to the builtin registry since): purge must remove it with the config.
    render_uat(tmp_path / "uat", "manager")
    watch = stage.conf_dir / WATCH_FILE
    shutil.copy2(tmp_path / "uat/etc/ays" / WATCH_FILE, watch)
    install(stage, "manager")
    ok(lifecycle(stage, "manager", "start"))
    pid = stage.pid("manager")
    running = streams(stage, "manager")
    program = stage.program("manager")
    program.write_text('#!/bin/sh\necho "this build is broken" >&2\nexit 3\n')
    result = lifecycle(stage, "manager", "reload")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"reload failed, pid {pid} serves on" in result.stderr
    assert "exited with status 3 before it was ready" in result.stderr
    assert stage.pid("manager") == pid
    code, text = status_of(stage, "manager")
    assert code == 0 and f"pid:       {pid}" in text and "failed:" in text
    assert_no_failures(running)
    assert "this build is broken" in (stage.log_dir / "aysmanager.log").read_text()
    ok(lifecycle(stage, "manager", "stop"))
    purged = ok(lifecycle(stage, "manager", "uninstall", "--purge"))
    assert not (stage.conf_dir / "manager.yaml").exists()
    assert not stage.data_dir("manager").exists()
    assert f"removed {watch}\n" in purged and not watch.exists()
    assert files_under(stage.conf_dir) == [stage.conf_dir / "node.yaml"]


def test_purging_the_manager_removes_the_consul_watch_and_purging_the_node_keeps_it(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    render_uat(root, "manager")
    render_uat(root, "node", "-g", GROUP)
    watch = root / "etc/ays" / WATCH_FILE
    assert watch.is_file()

    ok(run(NODE, "install", "-e", "uat", "--root", root))
    ok(run(NODE, "uninstall", "--purge", "-e", "uat", "--root", root))
    assert files_under(root) == [watch, root / "etc/ays/manager.yaml"]  # the manager's own

    ok(run(MANAGER, "install", "-e", "uat", "--root", root))
    kept = ok(run(MANAGER, "uninstall", "-e", "uat", "--root", root))
    assert f"kept {root}/etc/ays/manager.yaml, {watch}, " in kept and watch.is_file()
    ok(run(MANAGER, "install", "-e", "uat", "--root", root))
    purged = ok(run(MANAGER, "uninstall", "--purge", "-e", "uat", "--root", root))
    assert f"removed {watch}\n" in purged
    assert files_under(root) == []
    assert not (root / "etc/ays").exists()


def test_purging_a_service_never_installed_removes_its_config_without_a_traceback(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    render_uat(root, "manager")
    purged = run(MANAGER, "uninstall", "--purge", "-e", "uat", "--root", root)
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert "Traceback" not in purged.stderr
    assert files_under(root) == []


@pytest.mark.parametrize(
    "foreign",
    ["extended", "edited", "not json", "a link"],
)
def test_purge_keeps_a_file_at_the_watch_path_that_is_not_the_watch_installconfig_renders(
    tmp_path: Path, foreign: str
) -> None:
    root = tmp_path / "root"
    render_uat(root, "manager")
    watch = root / "etc/ays" / WATCH_FILE
    rendered = json.loads(watch.read_text())
    if foreign == "extended":  # an operator added a watch of their own
        rendered["watches"].append({"type": "service", "service": "web", "args": ["/bin/true"]})
        watch.write_text(json.dumps(rendered))
    elif foreign == "edited":  # ... or pointed the handler elsewhere
        rendered["watches"][0]["http_handler_config"]["path"] = "http://10.0.0.9/hook"
        watch.write_text(json.dumps(rendered))
    elif foreign == "not json":
        watch.write_text("watches = []\n")
    else:
        target = tmp_path / "elsewhere.json"
        watch.rename(target)
        watch.symlink_to(target)
    before = watch.read_text()

    ok(run(MANAGER, "install", "-e", "uat", "--root", root))
    purged = ok(run(MANAGER, "uninstall", "--purge", "-e", "uat", "--root", root))

    assert f"kept {watch}: not the Consul watch installConfig renders" in purged
    assert watch.read_text() == before
    assert files_under(root) == [watch]


@pytest.mark.slow
def test_a_reload_under_systemd_announces_the_new_main_pid_from_the_old_one(stage: Stage) -> None:
    """What systemd sees with Type=notify and NotifyAccess=main: every message comes from
    the main pid of the moment: READY=1; on reload RELOADING=1, then MAINPID=<new> with
    READY=1 from the old main; STOPPING=1 from the new one."""
    install(stage, "node")
    address = str(stage.root / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.settimeout(60)

        def receive() -> tuple[int, list[str]]:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = next(
                struct.unpack("iII", d[:12])[0]
                for level, kind, d in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            return pid, data.decode().split("\n")

        env = {**os.environ, "NOTIFY_SOCKET": address}
        first = subprocess.Popen(
            [str(stage.program("node")), "serve", "--root", str(stage.root)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stage.started.add(first.pid)
        sender, fields = receive()
        assert sender == first.pid and "READY=1" in fields
        first.send_signal(signal.SIGHUP)
        sender, fields = receive()
        assert sender == first.pid and fields[0] == "RELOADING=1"
        sender, fields = receive()
        assert sender == first.pid and fields[0].startswith("MAINPID=") and "READY=1" in fields
        new = int(fields[0].removeprefix("MAINPID="))
        stage.started.add(new)
        assert new != first.pid and stage.pid("node") == new
        assert first.wait(60) == 0  # the old one leaves once it has let go
        os.kill(new, signal.SIGTERM)
        sender, fields = receive()
        assert (sender, fields) == (new, ["STOPPING=1"])
        wait_for(lambda: not process_alive(new), 60, "the new node to stop")


def test_a_frozen_bundle_is_installed_as_a_release_linked_by_the_programs_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ays_installer import services
    from ays_installer.layout import Installation

    bundle = tmp_path / "uat_ays"
    (bundle / "_internal").mkdir(parents=True)
    (bundle / "ays").write_text('#!/bin/sh\necho frozen "$(basename "$0")"\n')
    (bundle / "ays").chmod(0o755)
    (bundle / "aysManager").symlink_to("ays")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(bundle / "aysManager"))  # run through the link
    inst = Installation("manager", tmp_path / "root", tmp_path / "root/etc/ays/manager.yaml")
    stamps = iter(["20260101000000", "20260102000000", "20260103000000"])
    monkeypatch.setattr(services.time, "strftime", lambda _: next(stamps))
    for _ in range(3):
        services._install_program(inst)
    releases = sorted(p.name for p in (inst.install_dir / "releases").iterdir())
    assert len(releases) == 2 and releases[-1].endswith("20260103000000")  # this and the last
    assert os.readlink(inst.program) == f"releases/{releases[-1]}/ays"
    assert ok(run(inst.program)) == "frozen aysManager\n"  # the multicall name is kept


@pytest.mark.slow
def test_node_status_shows_its_registration_and_the_managers_view_and_says_when_beats_fail(
    stage: Stage,
) -> None:
    install(stage, "manager")
    install(stage, "node")
    ok(lifecycle(stage, "manager", "start"))
    ok(lifecycle(stage, "node", "start"))
    beats_to = f"http://127.0.0.1:{stage.manager_port}/api/v1/nodes/heartbeat"
    manager_url = f"http://127.0.0.1:{stage.manager_port}"
    try:
        text = wait_for(
            lambda: "lists it online" in (t := status_of(stage, "node")[1]) and t,
            30,
            "the node joined, as its status says",
        )
        assert re.search(
            rf"registry:  builtin, heartbeats to {beats_to}: joined, last beat taken \d+ s ago",
            text,
        ), text
        assert re.search(
            rf"manager:   {manager_url} lists it online in group {GROUP}, last seen \d+ s ago",
            text,
        ), text
        assert re.search(r"uptime:    \d+ s \(since ", text), text
        assert "uptime_s" not in text and "registration" not in text
        code, text = status_of(stage, "manager")
        assert code == 0, text
        assert f"nodes:     1 of 1 online (builtin registry); by group: {GROUP} 1/1" in text
        assert "managers:  1 live, dividing the enabled tasks" in text, text
        assert re.search(rf"127\.0\.0\.1:{stage.manager_port} \(this one\): owns \d+ task", text)

        ok(lifecycle(stage, "manager", "stop"))
        text = wait_for(
            lambda: "FAILING" in (t := status_of(stage, "node")[1]) and t,
            30,
            "the node's status to show its failing heartbeats",
        )
        assert re.search(
            rf"registry:  builtin, heartbeats to {beats_to}: FAILING for \d+ s: ConnectError",
            text,
        ), text
        assert "; last beat taken" in text
        assert f"manager:   no answer from {manager_url} (ConnectError" in text
        assert status_of(stage, "node")[0] == 0  # the node itself runs: LSB "running"
    finally:
        lifecycle(stage, "node", "stop")
        lifecycle(stage, "manager", "stop")


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (13.030858, "13 s"),
        (0, "0 s"),
        (253, "4 min 13 s"),
        (7440, "2 h 4 min"),
        (266400, "3 d 2 h"),
    ],
)
def test_durations_read_as_whole_units(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown
