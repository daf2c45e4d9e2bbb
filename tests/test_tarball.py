"""The uat tarball, built by make.sh and used as an operator would: unpacked outside the
checkout and run with an environment that hides the project's virtualenv (PATH=/usr/bin:/bin,
nothing else of ours), so the frozen programs must bring everything but the C library.

The build runs once per session (`make.sh --env uat --check-repro`: two full PyInstaller
freezes of one snapshot, packaged and compared member by member), about two minutes on an
idle 2-core machine. Every frozen process is also checked to have mapped no file of the
build's Python, of the virtualenv or of the checkout.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from sqlalchemy.engine import make_url

from tests.daemons import free_port, wait_for
from tests.emulators.consul import ConsulEmulator
from tests.emulators.rocketmq import RocketMQEmulator
from tests.test_env_search import check_the_search_order

pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 1800  # two freezes on a loaded 2-core machine take up to about 6 minutes
WALK_TIMEOUT = 600  # a walk-through that shows no run by then has failed: it is ended
SECRETS = {
    "AYS_ACCESS_TOKEN": "tarball-test-token",
    "AYS_CLUSTER_SECRET": "tarball-test-token-cluster",
    "AYS_DB_PASSWORD": "tarball-test-db-password",
    "AYS_CONSUL_TOKEN": "tarball-test-consul-token",
    "AYS_ROCKETMQ_SECRET": "tarball-test-rocketmq-secret",
}
FINAL = {"succeeded", "failed", "timed_out", "killed", "node_lost", "skipped", "discarded"}
# Where the build's own Python lives: a frozen program must not map any file from there.
FORBIDDEN = sorted({str(CHECKOUT), sys.prefix, sys.base_prefix, os.path.realpath(sys.prefix)})


@dataclass(frozen=True)
class Build:
    tarball: Path
    output: str  # what make.sh printed
    returncode: int


@dataclass(frozen=True)
class Unpacked:
    top: Path  # <tmp>/uat_ays
    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        """An environment with nothing of the project's Python in it."""
        return {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8", **extra}

    def run(self, program: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.top / program), *args],
            env=self.env(**extra),
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    base = tmp_path_factory.mktemp("tarball")
    done = subprocess.run(
        [
            "bash",
            str(CHECKOUT / "make.sh"),
            "--env",
            "uat",
            "--check-repro",
            "--out",
            str(base / "bin"),
            "--work",
            str(base / "work"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    tarball = base / "bin" / "uat_ays.tar.gz"
    if not tarball.is_file():
        pytest.fail(f"make.sh made no {tarball} (exit {done.returncode}):\n{done.stdout}")
    return Build(tarball, done.stdout, done.returncode)


@pytest.fixture(scope="session")
def unpacked(build: Build, tmp_path_factory: pytest.TempPathFactory) -> Unpacked:
    base = tmp_path_factory.mktemp("operator")
    assert not base.resolve().is_relative_to(CHECKOUT)
    home = base / "home"
    home.mkdir()
    subprocess.run(
        ["tar", "xzf", str(build.tarball), "-C", str(base)],
        env={"PATH": "/usr/bin:/bin"},
        check=True,
    )
    return Unpacked(base / "uat_ays", home)


# --- the tarball itself ---------------------------------------------------------------------


def test_the_tarball_holds_the_three_programs_the_env_templates_install_version_and_sums(
    build: Build, unpacked: Unpacked
) -> None:
    top = unpacked.top
    for name in ("installConfig", "aysManager", "aysNode"):
        assert (top / name).is_symlink() and os.readlink(top / name) == "ays"
    assert os.access(top / "ays", os.X_OK)
    assert sorted(p.name for p in (top / "envs").iterdir()) == ["dev.yaml", "uat.yaml"]
    assert (top / "envs" / "uat.yaml").read_bytes() == (CHECKOUT / "envs/uat.yaml").read_bytes()
    assert (top / "templates" / "config" / "manager.yaml.j2").is_file()
    install = (top / "INSTALL").read_text()
    assert "./installConfig manager -e uat -p 172.21.16.81 -P 18080" in install
    assert "./aysNode install -e uat -g node_group_ksa -p 172.21.16.121 -P 18181" in install
    assert (
        "export AYS_ACCESS_TOKEN=... AYS_CLUSTER_SECRET=... AYS_DB_PASSWORD=... "
        "AYS_CONSUL_TOKEN=... AYS_ROCKETMQ_SECRET=..." in install
    )
    version = (top / "VERSION").read_text()
    assert re.match(r"ays \d+\.\d+\.\d+\+g[0-9a-f]{7}", version) and "env uat" in version
    checked = subprocess.run(
        ["sha256sum", "--check", "--strict", "--quiet", "SHA256SUMS"],
        cwd=top,
        env=unpacked.env(),
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with tarfile.open(build.tarball) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    assert len({m.mtime for m in members}) == 1
    assert build.tarball.read_bytes()[4:8] == b"\0\0\0\0", "gzip header mtime is 0"


def test_two_builds_of_one_snapshot_are_byte_identical(build: Build) -> None:
    assert build.returncode == 0, build.output
    assert "uat: byte-identical" in build.output, build.output


# --- installConfig on the uat env -------------------------------------------------------------


def _skip_preflight(unpacked: Unpacked) -> list[str]:
    """installConfig's RocketMQ preflight needs the env's proxy: skipped for staging."""
    shown = unpacked.run("installConfig", "manager", "--help").stdout
    return ["--skip-preflight"] if "--skip-preflight" in shown else []


def test_the_frozen_installconfig_renders_the_uat_config_from_the_bundle(
    unpacked: Unpacked, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    done = unpacked.run(
        "installConfig",
        "manager",
        "-e",
        "uat",
        "--root",
        str(root),
        "-p",
        "172.21.16.81",
        "-P",
        "18080",
        *_skip_preflight(unpacked),
        **SECRETS,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    config = root / "etc" / "ays" / "manager.yaml"
    assert f"wrote {config}" in done.stdout
    assert oct(config.stat().st_mode & 0o777) == "0o640"
    rendered = yaml.safe_load(config.read_text())
    assert rendered["env"] == "uat" and rendered["registry"]["backend"] == "consul"
    assert rendered["manager"]["port"] == 18080
    for secret in SECRETS.values():
        assert secret not in done.stdout + done.stderr


# --- a frozen manager and node on the embedded default ---------------------------------------


class Frozen:
    """A frozen daemon run from the unpacked tarball with the clean environment."""

    def __init__(
        self, unpacked: Unpacked, args: list[str], log: Path, health: str, **extra: str
    ) -> None:
        self.args, self.log_path, self.health = args, log, health
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(unpacked.top / args[0]), *args[1:]],
            env=unpacked.env(**extra),
            cwd=unpacked.home,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.args} exited {self.proc.returncode}:\n{self.log()}")
            try:
                answer = httpx.get(self.health, timeout=1)
                if answer.status_code == 200:
                    return dict(answer.json())
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.args} not healthy after {timeout}s:\n{self.log()}")

    def mapped_files(self) -> set[str]:
        maps = Path(f"/proc/{self.proc.pid}/maps").read_text()
        return {line.split(None, 5)[5] for line in maps.splitlines() if len(line.split()) == 6}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def frozen(unpacked: Unpacked, tmp_path: Path) -> Iterator[Any]:
    started: list[Frozen] = []

    def start(*args: str, health: str, **extra: str) -> Frozen:
        daemon = Frozen(
            unpacked, list(args), tmp_path / f"{args[0]}-{len(started)}.log", health, **extra
        )
        started.append(daemon)
        return daemon

    yield start
    for daemon in reversed(started):
        daemon.stop()


def _api(port: int, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}/api/v1",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def _run_a_shell_job(api: httpx.Client, group: str, marker: str) -> dict[str, Any]:
    task = api.post(
        "/tasks",
        json={
            "name": f"frozen-{marker}",
            "node_group": group,
            "schedule": "0 0 0 1 1 *",
            "task_type": "shell",
            "payload": {"command": f"echo {marker} job $AYS_JOB_ID; uname -s"},
        },
    )
    assert task.status_code == 201, task.text
    task_id = task.json()["id"]
    fired = api.post(f"/tasks/{task_id}/trigger", json={})
    assert fired.status_code == 202, fired.text
    job = fired.json()["job_log_id"]

    def finished() -> dict[str, Any] | None:
        items = api.get("/job-logs", params={"task_id": task_id}).json()["items"]
        return next((r for r in items if r["id"] == job and r["status"] in FINAL), None)

    run: dict[str, Any] = wait_for(finished, 30, f"job {job} finished", interval=0.2)
    assert run["status"] == "succeeded", run
    assert run["output"].split() == [marker, "job", str(job), "Linux"], run
    return run


def _assert_self_contained(*daemons: Frozen) -> None:
    for daemon in daemons:
        leaked = sorted(
            f for f in daemon.mapped_files() if any(f.startswith(p + "/") for p in FORBIDDEN)
        )
        assert not leaked, f"{daemon.args[0]} maps files of the build's Python: {leaked[:5]}"


def test_a_frozen_manager_and_node_on_the_dev_env_run_a_shell_job_and_store_its_result(
    unpacked: Unpacked, frozen: Any, tmp_path: Path
) -> None:
    root, mport, nport = tmp_path / "root", free_port(), free_port()
    for role, extra in (("manager", []), ("node", ["-g", "g1", "-m", f"127.0.0.1:{mport}"])):
        port = mport if role == "manager" else nport
        done = unpacked.run(
            "installConfig",
            role,
            "-e",
            "dev",
            "--root",
            str(root),
            "-p",
            "127.0.0.1",
            "-P",
            str(port),
            *extra,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    conf = root / "etc" / "ays"

    manager = frozen(
        "aysManager",
        "debug",
        "--config",
        str(conf / "manager.yaml"),
        health=f"http://127.0.0.1:{mport}/api/v1/health",
    )
    health = manager.wait_healthy()
    version = (unpacked.top / "VERSION").read_text().split()[1]
    assert health["version"] == version
    token = (root / "var" / "lib" / "ays" / "access_token").read_text().strip()
    _assert_console_served(mport, token)
    with _api(mport, token) as api:
        assert api.post("/node-groups", json={"name": "g1"}).status_code == 201
        node = frozen(
            "aysNode",
            "debug",
            "--config",
            str(conf / "node.yaml"),
            health=f"http://127.0.0.1:{nport}/api/v1/health",
        )
        node.wait_healthy()
        wait_for(
            lambda: api.get("/nodes", params={"status": "online"}).json()["items"],
            20,
            "the frozen node online",
        )
        run = _run_a_shell_job(api, "g1", "dev")
    assert run["node"] == f"127.0.0.1:{nport}"
    # prometheus-client is in the bundle: both serve their metrics (the run counted); a
    # node takes only the cluster secret (the dev manager generated it beside the token).
    cluster = (root / "var" / "lib" / "ays" / "cluster_secret").read_text().strip()
    for port, series, secret in (
        (mport, "ays_runs_finished_total", token),
        (nport, "ays_node_runs_finished_total", cluster),
    ):
        scraped = httpx.get(
            f"http://127.0.0.1:{port}/metrics", headers={"X-Ays-Token": secret}, timeout=30
        )
        assert scraped.status_code == 200 and series in scraped.text, scraped.text[:500]
    _assert_self_contained(manager, node)
    assert node.stop() == 0, node.log()
    assert manager.stop() == 0, manager.log()


def _assert_console_served(port: int, token: str) -> None:
    """The frozen manager serves the console and /docs with every asset from the bundle."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as browser:
        assert browser.post("/login", data={"token": token}).status_code == 303
        for path in ("/tasks", "/docs"):
            page = browser.get(path)
            assert page.status_code == 200, page.text
            assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
            assert assets, path
            for asset in assets:
                assert browser.get(asset).status_code == 200, asset


# --- the production backends' clients, frozen: Consul and RocketMQ (emulators) ----------------


def test_frozen_programs_reach_consul_and_rocketmq_through_their_real_clients(
    unpacked: Unpacked, frozen: Any, tmp_path: Path
) -> None:
    """A new env file dropped into the unpacked envs/ (no rebuild) names a Consul registry
    and RocketMQ dispatch, here the emulators: the preflight (gRPC), the node's Consul
    membership and a job's round trip through RocketMQ all run in the frozen programs."""
    env = f"emu{os.getpid()}"
    prefix = f"ays_{env}_"
    topics = [f"{prefix}g1", f"{prefix}g1_bcast", f"{prefix}result"]
    mport, nport, root = free_port(), free_port(), tmp_path / "root"
    consul = ConsulEmulator(token=SECRETS["AYS_CONSUL_TOKEN"]).start()
    try:
        with RocketMQEmulator(topics=topics) as rocketmq:
            env_file = unpacked.top / "envs" / f"{env}.yaml"
            env_file.write_text(
                yaml.safe_dump(
                    {
                        "env": env,
                        "access_token": "${AYS_ACCESS_TOKEN}",
                        "cluster_secret": "${AYS_CLUSTER_SECRET}",
                        "storage": {"url": "sqlite:///{data_dir}/ays.db"},
                        "registry": {
                            "backend": "consul",
                            "host": "127.0.0.1",
                            "port": consul.port,
                            "token": "${AYS_CONSUL_TOKEN}",
                            "kv_prefix": f"ays/{env}",
                            "datacenter": "dc1",
                            "check_interval": 1,
                            "check_timeout": 1,
                            "deregister_after": 60,
                        },
                        "transport": {
                            "backend": "rocketmq",
                            "endpoints": [rocketmq.endpoint],
                            "topic_prefix": prefix,
                            "result_topic": f"{prefix}result",
                        },
                        "manager": {"ip": "127.0.0.1", "port": mport},
                        "node": {"ip": "127.0.0.1", "port": nport},
                    }
                )
            )
            try:
                _consul_rocketmq_round_trip(unpacked, frozen, env, root, mport, nport)
            finally:
                env_file.unlink()
    finally:
        consul.stop()


def _consul_rocketmq_round_trip(
    unpacked: Unpacked, frozen: Any, env: str, root: Path, mport: int, nport: int
) -> None:
    node_args = ["-g", "g1", "-m", f"127.0.0.1:{mport}"]
    for role, extra in (("manager", []), ("node", node_args)):
        done = unpacked.run(
            "installConfig", role, "-e", env, "--root", str(root), *extra, **SECRETS
        )
        assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok           topic ays_{env}_g1_bcast" in done.stdout, done.stdout
    conf = root / "etc" / "ays"
    manager = frozen(
        "aysManager",
        "debug",
        "--config",
        str(conf / "manager.yaml"),
        health=f"http://127.0.0.1:{mport}/api/v1/health",
        **SECRETS,
    )
    manager.wait_healthy()
    with _api(mport, SECRETS["AYS_ACCESS_TOKEN"]) as api:
        assert api.post("/node-groups", json={"name": "g1"}).status_code == 201
        node = frozen(
            "aysNode",
            "debug",
            "--config",
            str(conf / "node.yaml"),
            health=f"http://127.0.0.1:{nport}/api/v1/health",
            **SECRETS,
        )
        node.wait_healthy()
        wait_for(
            lambda: api.get("/nodes", params={"status": "online"}).json()["items"],
            30,
            "the frozen node online through Consul",
        )
        run = _run_a_shell_job(api, "g1", env)
    assert run["node"] == f"127.0.0.1:{nport}"
    _assert_self_contained(manager, node)


# --- the frozen program installs itself as a service (staged) --------------------------------


def test_the_frozen_manager_installs_itself_then_starts_reloads_and_stops(
    unpacked: Unpacked, tmp_path: Path
) -> None:
    """`aysManager install` copies the bundle it runs from (links included) and the installed
    link keeps the program's name; a reload runs the installed frozen program again."""
    root, port = tmp_path / "root", free_port()
    steps = [
        ["installConfig", "manager", "-e", "dev", "--root", str(root)],
        ["aysManager", "install", "-e", "dev", "--root", str(root)],
    ]
    for step in steps:
        done = unpacked.run(*step, "-p", "127.0.0.1", "-P", str(port))
        assert done.returncode == 0, done.stdout + done.stderr
    program = root / "opt" / "ays" / "aysmanager" / "aysManager"
    assert program.is_symlink() and program.resolve().name == "ays"
    started = unpacked.run(str(program), "start", "--root", str(root))
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        health = f"http://127.0.0.1:{port}/api/v1/health"
        wait_for(lambda: _answers(health), 30, "the installed manager healthy")
        reloaded = unpacked.run(str(program), "reload", "--root", str(root))
        assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
        assert _answers(health)
    finally:
        stopped = unpacked.run(str(program), "stop", "--root", str(root))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# --- INSTALL, run as written (addresses, ports and --root staged) ---------------------------


def install_commands(install: str, heading: str, until: str) -> list[str]:
    """The command lines (indented four spaces) of INSTALL between two headings, without
    their trailing comments."""
    section = install.split(heading, 1)[1].split(until, 1)[0]
    return [
        re.sub(r"\s{2,}#.*$", "", line[4:])
        for line in section.splitlines()
        if line.startswith("    ") and line.strip()
    ]


def staged_commands(lines: list[str], replace: dict[str, str], root: Path | None) -> str:
    """A bash script of `lines` with the test's addresses and ports, and `--root` after each
    of the three programs' commands when `root` is given (what an operator's / would be)."""
    script = ["set -euo pipefail"]
    for line in lines:
        for old, new in replace.items():
            line = line.replace(old, new)
        if root is not None and line.startswith(("./installConfig", "./aysManager", "./aysNode")):
            line += f" --root {root}"
        script.append(line)
    return "\n".join(script) + "\n"


def test_installs_dev_walk_through_runs_as_written_to_a_successful_job(
    unpacked: Unpacked, tmp_path: Path
) -> None:
    install = (unpacked.top / "INSTALL").read_text()
    lines = install_commands(install, "1. A first job", "2. The uat environment")
    assert lines[0].startswith("./installConfig manager -e dev --root /tmp/ays-dev")
    stage, mport, nport = tmp_path / "ays-dev", free_port(), free_port()
    script = staged_commands(
        lines, {"/tmp/ays-dev": str(stage), "18080": str(mport), "18181": str(nport)}, None
    )
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=unpacked.top,
        env=unpacked.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    said: list[str] = []
    watchdog = threading.Timer(WALK_TIMEOUT, proc.kill)  # `--follow` alone never ends
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # until the follow shows a run: then Ctrl-C it, as INSTALL says
            said.append(line.rstrip("\n"))
            if line.startswith("run "):
                follower = next(
                    p
                    for p in psutil.Process(proc.pid).children(recursive=True)
                    if "--follow" in p.cmdline()
                )
                follower.send_signal(signal.SIGINT)
        code = proc.wait(60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        subprocess.run(
            [str(unpacked.top / "aysNode"), "stop", "--root", str(stage)],
            env=unpacked.env(),
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [str(unpacked.top / "aysManager"), "stop", "--root", str(stage)],
            env=unpacked.env(),
            capture_output=True,
            timeout=120,
        )
    text = "\n".join(said)
    assert code == 0, text
    assert re.search(r"aysnode: builtin, heartbeats to .*: joined", text), text
    assert "lists it online in group default" in text, text
    first_run = next(line for line in said if line.startswith("run "))
    assert ": succeeded exit=0;" in first_run and "output: hello from " in first_run, text
    assert "aysnode stopped" in text and "aysmanager stopped" in text, text


def test_installs_uat_walk_through_installs_a_manager_and_a_node_that_joins_it(
    unpacked: Unpacked, tmp_path: Path, mysql_url: str
) -> None:
    """INSTALL's uat commands against the emulators and the test's MariaDB: the operator's
    edited uat.yaml in the staged /etc/ays/envs/ (found before the bundled one)."""
    install = (unpacked.top / "INSTALL").read_text()
    lines = install_commands(install, "2. The uat environment", "\nUpgrade\n")
    assert not [line for line in lines if "--root" in line]
    runnable = [line for line in lines if not line.startswith("export ")]
    assert len(runnable) == len(lines) - 1
    stage, mport, nport = tmp_path / "root", free_port(), free_port()
    db = make_url(mysql_url)
    consul = ConsulEmulator(token=SECRETS["AYS_CONSUL_TOKEN"]).start()
    topics = ["ays_uat_node_group_ksa", "ays_uat_node_group_ksa_bcast", "ays_uat_result"]
    try:
        with RocketMQEmulator(topics=topics) as rocketmq:
            env = yaml.safe_load((unpacked.top / "envs" / "uat.yaml").read_text())
            env["storage"]["url"] = (
                f"mysql+pymysql://{db.username}:${{AYS_DB_PASSWORD}}@{db.host}:{db.port}/"
                f"{db.database}"
            )
            env["registry"].update(host="127.0.0.1", port=consul.port, check_interval=1)
            env["transport"]["endpoints"] = [rocketmq.endpoint]
            own = stage / "etc" / "ays" / "envs" / "uat.yaml"
            own.parent.mkdir(parents=True)
            own.write_text(yaml.safe_dump(env))
            script = staged_commands(
                runnable,
                {
                    "172.21.16.81": "127.0.0.1",
                    "172.21.16.121": "127.0.0.1",
                    "18080": str(mport),
                    "18181": str(nport),
                },
                stage,
            )
            secrets = {**SECRETS, "AYS_DB_PASSWORD": db.password or ""}
            try:
                done = subprocess.run(
                    ["bash", "-c", script],
                    cwd=unpacked.top,
                    env=unpacked.env(**secrets),
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                assert done.returncode == 0, done.stdout + done.stderr
                said = done.stdout
                assert "installed aysmanager" in said and "installed aysnode" in said, said
                assert re.search(rf"aysnode: consul http://127.0.0.1:{consul.port}: joined", said)
                status = unpacked.run("aysManager", "status", "--root", str(stage), **secrets)
                assert "nodes:     1 of 1 online (consul registry)" in status.stdout, status
                assert (stage / "opt/ays/aysnode/aysNode").is_symlink()
            finally:
                for program in ("aysNode", "aysManager"):
                    unpacked.run(program, "stop", "--root", str(stage), **secrets)
    finally:
        consul.stop()


def test_the_frozen_installconfig_finds_an_env_in_envs_then_etc_ays_envs_then_the_bundle(
    unpacked: Unpacked, tmp_path: Path
) -> None:
    check_the_search_order(unpacked.top / "installConfig", tmp_path)
