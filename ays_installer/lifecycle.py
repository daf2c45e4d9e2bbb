"""`start|stop|status|restart|reload` of aysManager and aysNode.

Through systemctl when systemd is the init system and the unit is installed (never with
`--root`: a staged install always runs under own supervision); otherwise own supervision:

    start    runs `<program> serve --config FILE` in a session of its own (stdin /dev/null,
             stdout and stderr appended to <log_dir>/<service>.log, as the service's user when
             run by root) and waits for it to say READY on a pipe (or why it could not start)
    stop     SIGTERM to the pid in the pidfile, then waits (SIGKILL after --timeout)
    status   state, pid, uptime, memory, CPU, listening address, health answer, version
    reload   SIGHUP to the serving process, then waits for its reload record: the new pid,
             or why the new process did not take over (the old one serves on)
    restart  stop, then start

Exit codes follow the LSB (Linux Standard Base core, "Init Script Actions").
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import typer

from ays_installer.layout import Installation
from ays_runtime.config import EnvConfig
from ays_runtime.protocol import API
from ays_runtime.service import systemd
from ays_runtime.service.handover import (
    READY_FD,
    READY_TIMEOUT,
    exit_description,
    program_path,
    read_answer_blocking,
    stop_process,
)
from ays_runtime.service.layout import ServiceFiles, service_umask
from ays_runtime.service.pidfile import Pidfile, process_alive, still_running
from ays_runtime.service.runner import ReloadRecord

# LSB status codes
STATUS_RUNNING = 0
STATUS_DEAD_WITH_PIDFILE = 1
STATUS_NOT_RUNNING = 3
STATUS_UNKNOWN = 4
# LSB codes of the other actions
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NO_PRIVILEGE = 4
EXIT_NOT_INSTALLED = 5
EXIT_NOT_CONFIGURED = 6
EXIT_NOT_RUNNING = 7

STOP_TIMEOUT = 90.0  # as the units' TimeoutStopSec: a node's drain must fit
LOG_TAIL = 15  # lines of the log shown when a start fails
JOIN_WAIT = 30.0  # a started node has this long to join its registry before start returns


def say(message: str) -> None:
    typer.echo(message)


def warn(message: str) -> None:
    typer.echo(message, err=True)


@dataclass
class Lifecycle:
    inst: Installation
    config: EnvConfig

    @property
    def files(self) -> ServiceFiles:
        return self.inst.files(self.config)

    @property
    def pidfile(self) -> Pidfile:
        return Pidfile(self.files.pidfile)

    @property
    def service(self) -> str:
        return self.inst.service

    def under_systemd(self) -> bool:
        """systemctl manages it: systemd runs, the unit is installed, nothing is staged."""
        return (
            not self.inst.staged
            and systemd.booted()
            and self.inst.unit_path.exists()
            and shutil.which("systemctl") is not None
        )

    # --- start ---------------------------------------------------------------------------

    def start(self) -> int:
        code = self._start()
        if code == EXIT_OK and self.inst.role == "node":
            self._report_join()
        return code

    def _report_join(self) -> None:
        """A node that serves joins its registry next: wait for that (up to JOIN_WAIT) so
        that what follows (a task for its group) finds it, and say how it went. The node
        keeps trying either way; `status` shows it."""
        deadline = time.monotonic() + JOIN_WAIT
        while True:
            registration = _health(self.files).get("registration")
            if not isinstance(registration, dict):
                return  # no answer, or a node too old to say
            if registration.get("state") == "joined":
                say(f"{self.service}: {_registration(registration)}")
                return
            if time.monotonic() > deadline:
                warn(
                    f"{self.service}: not joined after {JOIN_WAIT:g}s: "
                    f"{_registration(registration)}; it keeps trying (see: status)"
                )
                return
            time.sleep(0.2)

    def _start(self) -> int:
        if self.under_systemd():
            return self._systemctl("start")
        pid = self.pidfile.running()
        if pid is not None:
            say(f"{self.service} is already running (pid {pid})")
            return EXIT_OK
        if self.pidfile.remove_stale():
            say(f"{self.service}: removed the stale pidfile {self.pidfile.path}")
        program = str(self.inst.program) if self.inst.program.exists() else program_path()
        argv = [program, "serve", "--config", str(self.inst.config_path)]
        log_file = self.files.log_file
        service_umask()  # the log (and what the service writes) as under systemd: 0640
        log_file.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        identity = self._identity()
        with open(log_file, "ab") as log:
            if identity is not None:
                os.fchown(log.fileno(), identity[0], identity[1])
            offset = log.tell()
            ready_r, ready_w = os.pipe()
            try:
                proc = subprocess.Popen(  # noqa: S603 - our own program
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                    start_new_session=True,  # no terminal, no signals from this session
                    pass_fds=(ready_w,),
                    env={**os.environ, READY_FD: str(ready_w)},
                    user=identity[0] if identity else None,
                    group=identity[1] if identity else None,
                    extra_groups=[] if identity else None,
                )
            except OSError as err:
                os.close(ready_r)
                warn(f"{self.service}: cannot run {program}: {err.strerror or err}")
                return EXIT_FAILED
            finally:
                os.close(ready_w)
        try:
            answer = read_answer_blocking(ready_r, READY_TIMEOUT + 10)
        finally:
            os.close(ready_r)
        text = (answer or b"").decode("utf-8", "replace").strip()
        if text.startswith("READY"):
            ip, port = self.files.address
            say(
                f"{self.service} started (pid {proc.pid}), listening on {ip}:{port}, log {log_file}"
            )
            # The daemon outlives this command (init reaps it): tell Popen not to wait for it
            # or warn that it still runs when this command exits.
            proc.returncode = 0
            return EXIT_OK
        if answer is None:
            why = f"not ready within {READY_TIMEOUT + 10:g}s; stopped it"
            stop_process(proc)
        elif text.startswith("FAIL"):
            why = text[5:]
            _wait_quietly(proc)
        else:
            code = _wait_quietly(proc)
            why = exit_description(code) if code is not None else "closed its ready pipe"
        warn(f"{self.service}: failed to start: {why}")
        tail = _tail(log_file, offset, LOG_TAIL)
        if tail:
            warn(f"last lines of {log_file}:\n{tail}")
        return EXIT_FAILED

    def _identity(self) -> tuple[int, int] | None:
        """(uid, gid) of the service's user when root starts an installed service."""
        if self.inst.staged or os.geteuid() != 0:
            return None
        try:
            account = pwd.getpwnam(self.files.section.user)
        except KeyError:
            return None  # not installed as a service: runs as whoever starts it
        return account.pw_uid, account.pw_gid

    # --- stop ----------------------------------------------------------------------------

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        if self.under_systemd():
            return self._systemctl("stop")
        pid = self.pidfile.running()
        if pid is None:
            self.pidfile.remove_stale()
            say(f"{self.service} is not running")
            return EXIT_OK
        return self._stop_pid(pid, timeout)

    def stop_if_running(self) -> None:
        if self.under_systemd():
            subprocess.run(["systemctl", "stop", self.service], check=False)
            return
        pid = self.pidfile.running()
        if pid is not None:
            self._stop_pid(pid, STOP_TIMEOUT)

    def _stop_pid(self, pid: int, timeout: float) -> int:
        say(f"{self.service}: stopping pid {pid} (up to {timeout:g}s: running work ends first)")
        # Signals go through a psutil handle: it refuses a pid recycled by another process.
        try:
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            proc = None
        except psutil.AccessDenied:
            warn(f"{self.service}: not allowed to signal pid {pid}; run it as root")
            return EXIT_NO_PRIVILEGE
        if proc is not None and not _wait_gone(proc, timeout):
            warn(f"{self.service}: pid {pid} still runs after {timeout:g}s: SIGKILL")
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
            _wait_gone(proc, 10)
        self.pidfile.remove_if_mine(pid)
        say(f"{self.service} stopped")
        return EXIT_OK

    # --- restart -------------------------------------------------------------------------

    def restart(self, timeout: float = STOP_TIMEOUT) -> int:
        if self.under_systemd():
            return self._systemctl("restart")
        code = self.stop(timeout)
        return code if code != EXIT_OK else self.start()

    # --- reload --------------------------------------------------------------------------

    def reload(self, pid: int | None = None, wait: bool = True) -> int:
        """Reload without interruption. `pid` (systemd's ExecReload passes $MAINPID) acts on
        that process directly: never through systemctl, which is running this very command."""
        if pid is None and self.under_systemd():
            code = self._systemctl("reload")
            if code != EXIT_OK:
                warn(f"{self.service}: see why with: journalctl -u {self.service} -n 30")
            return code
        if pid is None:
            pid = self.pidfile.running()
        proc = _process(pid) if pid is not None and process_alive(pid) else None
        if pid is None or proc is None:
            warn(f"{self.service} is not running: nothing to reload (start it)")
            return EXIT_NOT_RUNNING
        record = self.files.reload_record
        previous = ReloadRecord.read(record)
        seq = previous.seq if previous else 0
        try:
            proc.send_signal(signal.SIGHUP)
        except psutil.NoSuchProcess:
            warn(f"{self.service} is not running: nothing to reload (start it)")
            return EXIT_NOT_RUNNING
        except psutil.AccessDenied:
            warn(f"{self.service}: not allowed to signal pid {pid}; run it as root")
            return EXIT_NO_PRIVILEGE
        if not wait:
            say(f"{self.service}: asked pid {pid} to reload (SIGHUP)")
            return EXIT_OK
        say(f"{self.service}: reloading pid {pid}: a new process takes over the socket")
        deadline = time.monotonic() + READY_TIMEOUT + 30
        while True:
            latest = ReloadRecord.read(record)
            if latest is not None and latest.seq > seq and latest.old_pid == pid:
                break
            if not still_running(proc):
                log = self.files.log_file
                warn(f"{self.service}: pid {pid} exited during the reload; see {log}")
                return EXIT_FAILED
            if time.monotonic() > deadline:
                warn(f"{self.service}: pid {pid} did not finish the reload in time")
                return EXIT_FAILED
            time.sleep(0.1)
        if not latest.ok:
            warn(f"{self.service}: reload failed, pid {pid} serves on: {latest.message}")
            return EXIT_FAILED
        version = _health(self.files).get("version", "?")
        say(
            f"{self.service} reloaded: pid {latest.new_pid} serves now (version {version}); "
            f"pid {pid} finishes its work and exits"
        )
        return EXIT_OK

    # --- status --------------------------------------------------------------------------

    def status(self) -> int:
        manager = "own supervision"
        state = "running"
        if self.under_systemd():
            manager = "systemd"
            props = _systemctl_show(self.service, "ActiveState", "SubState", "MainPID")
            active = props.get("ActiveState", "unknown")
            state = f"{active} ({props.get('SubState', '?')})"
            pid = int(props.get("MainPID", "0") or 0) or None
            if active not in ("active", "reloading", "activating", "deactivating"):
                return self._not_running(manager, state, STATUS_NOT_RUNNING)
        else:
            try:
                pid = self.pidfile.running()
            except OSError:
                return self._not_running(manager, "unknown (cannot read pidfile)", STATUS_UNKNOWN)
            if pid is None:
                if self.pidfile.path.exists():
                    state = f"dead, but the pidfile {self.pidfile.path} remains"
                    return self._not_running(manager, state, STATUS_DEAD_WITH_PIDFILE)
                return self._not_running(manager, "not running", STATUS_NOT_RUNNING)
        ip, port = self.files.address
        say(f"{self.service}: {state} ({manager})")
        if pid is not None:
            for line in _process_lines(pid, ip, port):
                say(f"  {line}")
        health = _health(self.files)
        answer = health.get("_answer", "no answer")
        say(f"  health:    {answer}")
        say(f"  version:   {health.get('version', 'unknown (no health answer)')}")
        for line in _registry_lines(self.inst.role, self.config, health):
            say(f"  {line}")
        if self.inst.role == "manager":
            for line in _managers_lines(self.config):
                say(f"  {line}")
        latest = ReloadRecord.read(self.files.reload_record)
        if latest is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(latest.at))
            outcome = "ok" if latest.ok else "failed"
            say(f"  reload:    {when} {outcome}: {latest.message}")
        say(f"  config:    {self.inst.config_path}")
        say(f"  log:       {self.files.log_file}")
        return STATUS_RUNNING

    def _not_running(self, manager: str, state: str, code: int) -> int:
        say(f"{self.service}: {state} ({manager})")
        return code

    def _systemctl(self, action: str) -> int:
        result = subprocess.run(["systemctl", action, f"{self.service}.service"], check=False)
        if result.returncode == 0:
            say(f"{self.service}: systemctl {action}: done")
        return result.returncode


# --- helpers ------------------------------------------------------------------------------


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while still_running(proc):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _wait_quietly(proc: subprocess.Popen[bytes]) -> int | None:
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        return proc.returncode


def _tail(path: Path, offset: int, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _process_lines(pid: int, ip: str, port: int) -> list[str]:
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            started = proc.create_time()
            memory = proc.memory_info().rss
            times = proc.cpu_times()
            user = proc.username()
        cpu = proc.cpu_percent(interval=0.2)
        listening = [
            f"{c.laddr.ip}:{c.laddr.port}"
            for c in proc.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
    except psutil.NoSuchProcess:
        return [f"pid:       {pid} (gone just now)"]
    except psutil.AccessDenied:
        return [f"pid:       {pid} (details need root)"]
    uptime = duration(time.time() - started)
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    address = f"{ip}:{port}"
    if address in listening or f"[{ip}]:{port}" in listening:
        where = f"{address} (listening)"
    elif listening:
        where = f"{', '.join(listening)} (the config says {address})"
    else:
        where = f"{address} (config; not seen listening in this process)"
    return [
        f"pid:       {pid}, user {user}",
        f"uptime:    {uptime} (since {since})",
        f"memory:    {memory / 1048576:.1f} MiB resident",
        f"cpu:       {cpu:.1f}% now, {times.user + times.system:.1f}s in total",
        f"listening: {where}",
    ]


def duration(seconds: float) -> str:
    """`13 s`, `4 min 13 s`, `2 h 4 min`, `3 d 2 h`: the two largest units, whole."""
    seconds = max(0, int(seconds))
    units = [("d", 86400), ("h", 3600), ("min", 60), ("s", 1)]
    parts: list[str] = []
    for name, size in units:
        count, seconds = divmod(seconds, size)
        if count or parts or name == "s":
            parts.append(f"{count} {name}")
    return " ".join(parts[:2])


# Health fields shown on lines of their own (or not at all) rather than in the summary.
_HEALTH_DETAILS = {"version", "uptime_s", "registration", "manager_id", "address"}


def _health(files: ServiceFiles) -> dict[str, Any]:
    """The health endpoint's answer (no token needed), with `_answer` summing it up."""
    ip, port = files.address
    host = f"[{ip}]" if ":" in ip else ip
    url = f"http://{host}:{port}{API}/health"
    try:
        response = httpx.get(url, timeout=3)
    except httpx.HTTPError as err:
        return {"_answer": f"no answer from {url} ({type(err).__name__})"}
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    summary = ", ".join(
        f"{k.replace('_', ' ')} {v}" for k, v in body.items() if k not in _HEALTH_DETAILS
    )
    return {**body, "_answer": f"HTTP {response.status_code}: {summary}".strip()}


def _registry_lines(role: str, config: EnvConfig, health: dict[str, Any]) -> list[str]:
    """What the registry knows: for a node, its registration as it sees it and the manager's
    view of it; for a manager, its view of the nodes."""
    lines = []
    registration = None
    if role == "node":
        registration = health.get("registration")
        if isinstance(registration, dict):
            lines.append(f"registry:  {_registration(registration)}")
        elif health.get("version"):
            lines.append("registry:  not shown by this node (an older version)")
    label = "manager:  " if role == "node" else "nodes:    "
    # A node of several managers is asked about by the one it beats to now.
    beats_to = registration.get("target", "") if isinstance(registration, dict) else ""
    suffix = f"{API}/nodes/heartbeat"
    base = beats_to.removesuffix(suffix) if beats_to.endswith(suffix) else None
    lines.append(f"{label} {_manager_view(role, config, base)}")
    return lines


def _registration(reg: dict[str, Any]) -> str:
    """One line from the node's health `registration`."""
    if reg.get("registry") == "consul":
        where, ok = f"consul {reg.get('target')}", "registration confirmed"
    else:
        where, ok = f"builtin, heartbeats to {reg.get('target')}", "last beat taken"
    state = reg.get("state", "?")
    last_ok = _ago(reg.get("last_ok_at"))
    if state == "failing":
        since = _ago(reg.get("failing_since")).removesuffix(" ago") or "a while"
        line = f"{where}: FAILING for {since}: {reg.get('last_error')}"
        return f"{line}; {ok} {last_ok}" if last_ok else f"{line}; never joined"
    if state == "joined":
        return f"{where}: joined, {ok} {last_ok}"
    return f"{where}: {state}"


def _ago(stamp: object) -> str:
    if not isinstance(stamp, str):
        return ""
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return f"{duration((datetime.now(UTC) - moment).total_seconds())} ago"


def _api_get(
    config: EnvConfig, path: str, params: dict[str, Any], base: str | None = None
) -> dict[str, Any] | str:
    """GET `path` of the manager's API (the manager at `base`, default the config's): the
    JSON answer, or a line saying why there is none."""
    from ays_runtime.auth import auth_headers, resolve_access_token
    from ays_runtime.exceptions import ConfigError

    if base is None:
        host = f"[{config.manager.ip}]" if ":" in config.manager.ip else config.manager.ip
        base = f"http://{host}:{config.manager.port}"
    try:
        token = resolve_access_token(config, generate=False)
    except ConfigError as err:
        return f"cannot ask {base} (no access token: {err})"
    try:
        response = httpx.get(
            f"{base}{API}{path}", params=params, headers=auth_headers(token), timeout=5
        )
    except httpx.HTTPError as err:
        return f"no answer from {base} ({type(err).__name__}: {err})"
    if response.status_code != 200:
        return f"{base} answered HTTP {response.status_code} to GET {API}{path}"
    body = response.json()
    return body if isinstance(body, dict) else f"{base} answered GET {API}{path} with no object"


def _managers_lines(config: EnvConfig) -> list[str]:
    """The live managers sharing the database and the tasks each owns (GET /managers)."""
    answer = _api_get(config, "/managers", {})
    if isinstance(answer, str):
        return [f"managers:  {answer}"]
    me = answer.get("answered_by")
    live = [m for m in answer.get("managers", []) if m.get("alive")]
    lines = [f"managers:  {len(live)} live, dividing the enabled tasks"]
    for m in live:
        this = " (this one)" if m.get("manager_id") == me else ""
        lines.append(f"  {m.get('manager_id')}{this}: owns {m.get('tasks_owned', 0)} task(s)")
    return lines


def _manager_view(role: str, config: EnvConfig, base: str | None = None) -> str:
    """What the manager's API says (the manager at `base`, default the config's): about
    this node, or (for a manager) about every node."""
    answer = _api_get(config, "/nodes", {"limit": 1000}, base)
    if isinstance(answer, str):
        return answer
    nodes = answer.get("items", [])
    if role == "node":
        me = f"{config.node.ip}:{config.node.port}"
        row = next((n for n in nodes if f"{n['ip']}:{n['port']}" == me), None)
        if row is None:
            return f"{base} does not know this node ({me}) yet"
        seen = _ago(row.get("last_seen"))
        seen_text = f", last seen {seen}" if seen else ""
        return f"{base} lists it {row['status']} in group {row['node_group']}{seen_text}"
    groups: dict[str, list[int]] = {}
    for n in nodes:
        counts = groups.setdefault(n["node_group"], [0, 0])
        counts[0] += n["status"] == "online"
        counts[1] += 1
    online = sum(c[0] for c in groups.values())
    per_group = ", ".join(f"{g} {c[0]}/{c[1]}" for g, c in sorted(groups.items()))
    shown = f"{online} of {len(nodes)} online ({config.registry.backend} registry)"
    return f"{shown}; by group: {per_group}" if per_group else shown


def _systemctl_show(service: str, *names: str) -> dict[str, str]:
    result = subprocess.run(
        ["systemctl", "show", f"{service}.service", *(f"--property={n}" for n in names)],
        capture_output=True,
        text=True,
        check=False,
    )
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
