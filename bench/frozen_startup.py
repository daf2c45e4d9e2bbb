"""Start-up time of the frozen programs, from exec to a healthy endpoint (figures, not a test).

    .venv/bin/python bench/frozen_startup.py [--tarball build/bin/uat_ays.tar.gz] [--runs 7]

Unpacks the tarball into a temp dir, renders the dev env (SQLite, built-in registry and
transport) with the frozen installConfig, then measures, each as the median of --runs starts
(after one warm-up start that also migrates the database), with an environment that hides
this virtualenv (PATH=/usr/bin:/bin):

- `aysManager debug` until GET /api/v1/health answers 200, and `aysNode debug` likewise
  (with that manager up);
- `installConfig --help` and `aysNode version` to exit, called through the symlink the
  tarball ships and through a bash wrapper (`exec -a NAME ays "$@"`), the alternative;
- the same from this virtualenv's entry points, for comparison, when they are installed.

The health endpoint is polled every 5 ms, so figures are exact to about that.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

CHECKOUT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(home: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


CPU_TIMES: dict[str, list[float]] = {}  # label -> CPU seconds used up to healthy, per start


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (a one-dir PyInstaller program is one process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_to_healthy(
    command: list[str], url: str, env: dict[str, str], log: Path, label: str = ""
) -> float:
    """Seconds from exec to the first 200 from `url`; the process is then stopped (SIGINT).
    The CPU time it used up to then is kept in CPU_TIMES[label]."""
    with open(log, "ab") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            with httpx.Client(timeout=1) as http:
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"{command[0]} exited {proc.returncode}; see {log}")
                    try:
                        if http.get(url).status_code == 200:
                            elapsed = time.perf_counter() - started
                            CPU_TIMES.setdefault(label, []).append(cpu_seconds(proc.pid))
                            return elapsed
                    except httpx.HTTPError:
                        pass
                    if time.perf_counter() - started > 120:
                        raise RuntimeError(f"{command[0]} not healthy after 120 s; see {log}")
                    time.sleep(0.005)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def time_to_exit(command: list[str], env: dict[str, str], label: str = "") -> float:
    """Seconds from exec to exit; the CPU time it used is kept in CPU_TIMES[label]."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
    )
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    CPU_TIMES.setdefault(label, []).append(cpu)
    return elapsed


def median_of(runs: int, measure) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    measure()  # warm-up: page cache, database migration
    values = [measure() for _ in range(runs)]
    return statistics.median(values), min(values), max(values)


def show(what: str, figures: tuple[float, float, float], label: str = "") -> None:
    median, low, high = figures
    line = f"  {what:<52} {median * 1000:7.0f} ms  (min {low * 1000:.0f}, max {high * 1000:.0f})"
    if label in CPU_TIMES:
        cpu = CPU_TIMES[label][1:]  # without the warm-up
        line += f", CPU {statistics.median(cpu) * 1000:.0f} ms"
    print(line)


def render_dev(bin_dir: Path, root: Path, mport: int, nport: int, env: dict[str, str]) -> None:
    """installConfig manager and node -e dev, staged under `root`."""
    for role, port, extra in (
        ("manager", mport, []),
        ("node", nport, ["-g", "g1", "-m", f"127.0.0.1:{mport}"]),
    ):
        command = [str(bin_dir / "installConfig"), role, "-e", "dev", "--root", str(root)]
        command += ["-p", "127.0.0.1", "-P", str(port), *extra]
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)


def healthy(
    runs: int, what: str, command: list[str], port: int, env: dict[str, str], tmp: Path
) -> None:
    url = f"http://127.0.0.1:{port}/api/v1/health"
    log = tmp / f"{Path(command[0]).name}-{port}.log"
    show(what, median_of(runs, lambda: time_to_healthy(command, url, env, log, what)), what)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tarball", type=Path, default=CHECKOUT / "build/bin/uat_ays.tar.gz")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if not args.tarball.is_file():
        sys.exit(f"{args.tarball}: no tarball; build it first (make ENV=uat)")

    with tempfile.TemporaryDirectory(prefix="ays-startup-") as tmp_name:
        tmp = Path(tmp_name)
        with tarfile.open(args.tarball) as tar:
            tar.extractall(tmp, filter="tar")
        [top] = [p for p in tmp.iterdir() if p.is_dir()]
        home = tmp / "home"
        home.mkdir()
        env = clean_env(home)
        root, mport, nport = tmp / "root", free_port(), free_port()
        render_dev(top, root, mport, nport, env)
        conf = root / "etc/ays"
        wrapper = tmp / "wrapped"
        wrapper.mkdir()
        for name in ("installConfig", "aysNode"):
            script = wrapper / name
            script.write_text(f'#!/bin/bash\nexec -a "$0" {top / "ays"} "$@"\n')
            script.chmod(0o755)

        load = os.getloadavg()
        print(
            f"{args.tarball.name}: {args.runs} runs each, load average {load[0]:.1f} "
            f"{load[1]:.1f} {load[2]:.1f}, {os.cpu_count()} CPUs"
        )
        manager = [str(top / "aysManager"), "debug", "--config", str(conf / "manager.yaml")]
        node = [str(top / "aysNode"), "debug", "--config", str(conf / "node.yaml")]
        healthy(args.runs, "frozen aysManager debug -> healthy", manager, mport, env, tmp)
        with open(tmp / "manager-bg.log", "ab") as out:
            background = subprocess.Popen(manager, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            time.sleep(3)
            healthy(args.runs, "frozen aysNode debug -> healthy", node, nport, env, tmp)
        finally:
            background.send_signal(signal.SIGINT)
            background.wait(30)
        for label, base in (("symlink", top), ("bash wrapper", wrapper)):
            for command in (["installConfig", "--help"], ["aysNode", "version"]):
                argv = [str(base / command[0]), *command[1:]]
                what = f"frozen {' '.join(command)} ({label})"
                measure = lambda a=argv, w=what: time_to_exit(a, env, w)  # noqa: E731
                show(what, median_of(args.runs, measure), what)

        venv_bin = Path(sys.executable).parent
        if (venv_bin / "aysManager").exists():
            vroot = tmp / "venv-root"
            render_dev(venv_bin, vroot, mport, nport, dict(os.environ))
            vmanager = [str(venv_bin / "aysManager"), "debug", "--config"]
            vmanager.append(str(vroot / "etc/ays/manager.yaml"))
            what = "virtualenv aysManager debug -> healthy (comparison)"
            healthy(args.runs, what, vmanager, mport, dict(os.environ), tmp)
            argv = [str(venv_bin / "installConfig"), "--help"]
            what = "virtualenv installConfig --help (comparison)"
            venv_env = dict(os.environ)
            show(what, median_of(args.runs, lambda: time_to_exit(argv, venv_env, what)), what)
    return 0


if __name__ == "__main__":
    sys.exit(main())
