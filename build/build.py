"""Build the per-environment tarballs: freeze Ays once with PyInstaller, package it per env.

    python build/build.py                  every env in envs/ -> build/bin/<env>_ays.tar.gz
    python build/build.py --env uat        one env (repeatable)
    python build/build.py --check-repro    two full freezes, each packaged; compare the tarballs
    python build/build.py --from-commit    build HEAD as committed, not the working tree

Run it through make.sh (or `make`), which picks or creates the Python environment holding
PyInstaller and the project's dependencies. Steps, each announced as it starts:

1. snapshot: copy the shipped sources (the working tree's, tracked and untracked but not
   ignored; or HEAD's with --from-commit) into <work>/src: what is frozen cannot change
   under the build, and two builds of one tree freeze the same files;
2. freeze: PyInstaller on build/ays.spec with PYTHONHASHSEED=0 and SOURCE_DATE_EPOCH (the
   last commit's time, unless set), into <work>/dist/ays; its full log is kept in
   <work>/pyinstaller.log and its main phases are shown;
3. smoke test: the frozen program, called as aysNode with an empty environment, prints its
   version;
4. package: one tarball per env (build/package.py), its size and SHA-256 printed.

With --check-repro the snapshot is copied to a second directory, both copies are frozen from
scratch at the same time (each with its own PyInstaller work dir: two full builds in about
the wall time of one on two cores), both are packaged, the tarballs are compared member by
member and every difference is named (build/package.py compare). Exit status 1 when the
build is not reproducible.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import package  # noqa: E402  (build/ is not a package: it is the directory of this script)

CHECKOUT = Path(__file__).resolve().parent.parent
# What the freeze reads: everything else in the checkout (tests, bench, docs) stays out.
SHIPPED = [
    "ays_installer",
    "ays_runtime",
    "templates",
    "envs",
    "pyproject.toml",
    "build/ays.spec",
    "build/ays_main.py",
]
# PyInstaller log lines shown as progress (the rest goes to the log file only).
PHASES = re.compile(
    r"INFO: (Analyzing (?!hidden)\S+|Running Analysis|Building (PYZ|PKG|EXE|COLLECT)"
    r"(?!.*completed)|Build complete)"
)


class BuildError(Exception):
    """A step failed; the message says which and where to look."""


@dataclass(frozen=True)
class Source:
    commit: str  # full hash, or "unknown" outside a git checkout
    epoch: int  # SOURCE_DATE_EPOCH
    version: str  # PEP 440, e.g. 0.1.0+g94712f3 or 0.1.0+g94712f3.dirty
    dirty: bool


def say(message: str) -> None:
    print(f"build: {message}", flush=True)


class Steps:
    """Numbered progress lines with the time each step took."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self._step_started = self.started

    def begin(self, what: str) -> None:
        self.done += 1
        self._step_started = time.monotonic()
        say(f"[{self.done}/{self.total}] {what}")

    def end(self, what: str = "done") -> None:
        say(f"      {what} ({time.monotonic() - self._step_started:.1f} s)")


# --- sources ----------------------------------------------------------------------------------


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-c", f"safe.directory={CHECKOUT}", "-C", str(CHECKOUT), *args],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise BuildError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _has_git() -> bool:
    if shutil.which("git") is None:
        return False
    try:
        _git("rev-parse", "--git-dir")
    except BuildError:
        return False
    return True


def describe_source(from_commit: bool) -> Source:
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text(encoding="utf-8"))
    base = project["project"]["version"]
    epoch_env = os.environ.get("SOURCE_DATE_EPOCH", "")
    if not _has_git():
        if not epoch_env.isdigit():
            raise BuildError(
                f"{CHECKOUT} is not a git checkout (or git is missing): set SOURCE_DATE_EPOCH "
                f"(seconds since 1970) so that the tarballs' times are fixed"
            )
        return Source("unknown", int(epoch_env), f"{base}+unknown", dirty=True)
    commit = _git("rev-parse", "HEAD").strip()
    epoch = int(epoch_env) if epoch_env.isdigit() else int(_git("log", "-1", "--format=%ct"))
    dirty = not from_commit and bool(
        _git("status", "--porcelain", "--untracked-files=all", "--", *SHIPPED).strip()
    )
    version = f"{base}+g{commit[:7]}" + (".dirty" if dirty else "")
    return Source(commit, epoch, version, dirty)


def snapshot(dest: Path, from_commit: bool) -> int:
    """Copy the shipped sources into `dest` (emptied first); returns the number of files."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if from_commit:
        archive = dest.parent / f".{dest.name}.tar"
        with open(archive, "wb") as out:
            subprocess.run(
                [
                    "git",
                    "-c",
                    f"safe.directory={CHECKOUT}",
                    "-C",
                    str(CHECKOUT),
                    "archive",
                    "--format=tar",
                    "HEAD",
                    "--",
                    *SHIPPED,
                ],
                stdout=out,
                check=True,
            )
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
            count = sum(1 for m in tar.getmembers() if m.isfile())
        archive.unlink()
        return count
    if _has_git():
        listed = _git(
            "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *SHIPPED
        )
        names = [n for n in listed.split("\0") if n and (CHECKOUT / n).is_file()]
    else:
        names = [
            p.relative_to(CHECKOUT).as_posix()
            for top in SHIPPED
            for p in (
                [CHECKOUT / top]
                if (CHECKOUT / top).is_file()
                else sorted((CHECKOUT / top).rglob("*"))
            )
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        ]
    for name in sorted(set(names)):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(CHECKOUT / name, target)
    return len(names)


def envs_in(source: Path) -> list[str]:
    return sorted(p.stem for p in (source / "envs").glob("*.yaml"))


# --- freezing ---------------------------------------------------------------------------------


def freeze(
    source: Path, work: Path, dist: Path, built: Source, log_path: Path, label: str = ""
) -> Path:
    """PyInstaller on `source`/build/ays.spec; returns the bundle directory. Progress lines
    start with `label` (two freezes may run at once)."""
    env = {
        **os.environ,
        # PyInstaller's binary cache, per build: two freezes at once sharing ~/.cache/pyinstaller
        # race on its index (one reads it half-written: "SyntaxError" in load_py_data_struct).
        "PYINSTALLER_CONFIG_DIR": str(work.parent / "pyinstaller-config"),
        "PYTHONHASHSEED": "0",
        "SOURCE_DATE_EPOCH": str(built.epoch),
        "AYS_BUILD_VERSION": built.version,
    }
    command = [
        sys.executable,
        "-m",
        "PyInstaller",
        "--noconfirm",
        "--log-level",
        "INFO",
        "--workpath",
        str(work),
        "--distpath",
        str(dist),
        str(source / "build" / "ays.spec"),
    ]
    started = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=source,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if PHASES.search(line) or "ERROR" in line:
                shown = line.split("INFO: ", 1)[-1].strip().replace(str(source) + "/", "")
                say(f"      {label}{time.monotonic() - started:5.0f} s  {shown[:100]}")
        code = proc.wait()
    if code != 0:
        tail = "".join(log_path.read_text(encoding="utf-8").splitlines(True)[-25:])
        raise BuildError(f"{label}PyInstaller failed (exit {code}); full log: {log_path}\n{tail}")
    bundle = dist / "ays"
    if not (bundle / package.PROGRAM).is_file():
        raise BuildError(f"PyInstaller made no {bundle / package.PROGRAM}; log: {log_path}")
    return bundle


def smoke_test(bundle: Path, work: Path, built: Source) -> str:
    """Call the frozen program as aysNode with an empty environment: it must start."""
    link = work / "smoke" / "aysNode"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(bundle / package.PROGRAM)
    done = subprocess.run(
        [str(link), "--version"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        cwd=link.parent,
        timeout=120,
    )
    printed = done.stdout.strip()
    if done.returncode != 0 or built.version not in printed:
        raise BuildError(
            f"the frozen program does not start: `aysNode --version` exited {done.returncode}, "
            f"printed {printed!r} (expected {built.version}):\n{done.stderr[-2000:]}"
        )
    return ", ".join(printed.splitlines())


# --- the whole build --------------------------------------------------------------------------


def version_text(built: Source, env: str) -> str:
    glibc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    import PyInstaller

    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(built.epoch))
    return (
        f"ays {built.version}\n"
        f"env {env}\n"
        f"commit {built.commit}{' (with uncommitted changes)' if built.dirty else ''}\n"
        f"source date {when} (SOURCE_DATE_EPOCH {built.epoch})\n"
        f"python {platform.python_version()}, pyinstaller {PyInstaller.__version__}, "
        f"{platform.machine()}\n"
        f"needs {glibc or 'the build host C library'} or newer (the build host's)\n"
    )


def human(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build(args: argparse.Namespace) -> int:
    work: Path = args.work.resolve()
    out: Path = args.out.resolve()
    steps = Steps(total=5 if args.check_repro else 4)
    built = describe_source(args.from_commit)
    say(f"ays {built.version}, source date {built.epoch}, work dir {work}")
    if built.dirty:
        say(
            "note: the working tree has uncommitted changes in the shipped sources: the "
            "version says .dirty; use --from-commit to build HEAD as committed"
        )

    steps.begin("snapshot the sources" + (" of HEAD" if args.from_commit else ""))
    sources = [work / "src"]
    count = snapshot(sources[0], args.from_commit)
    if args.check_repro:  # the second build reads the same files from another path
        sources.append(work / "repro" / "src")
        if sources[1].exists():
            shutil.rmtree(sources[1])
        shutil.copytree(sources[0], sources[1], symlinks=True)
    steps.end(f"{count} files in {sources[0]}")

    known = envs_in(sources[0])
    envs = args.env or known
    unknown = sorted(set(envs) - set(known))
    if unknown:
        raise BuildError(f"no envs/{unknown[0]}.yaml: known environments are {', '.join(known)}")

    # Build 1 writes into <work> and --out; build 2 (--check-repro) into <work>/repro.
    bases = [work, work / "repro"][: len(sources)]
    labels = ["build 1: ", "build 2: "] if args.check_repro else [""]
    steps.begin(
        "freeze with PyInstaller"
        + (", twice at once, each from scratch" if args.check_repro else "")
        + f" (log: {' and '.join(str(b / 'pyinstaller.log') for b in bases)})"
    )
    if args.check_repro:
        for base in bases:  # nothing reused
            shutil.rmtree(base / "pyinstaller", ignore_errors=True)
            shutil.rmtree(base / "pyinstaller-config", ignore_errors=True)
    with ThreadPoolExecutor(len(sources)) as pool:
        bundles = list(
            pool.map(
                lambda i: freeze(
                    sources[i],
                    bases[i] / "pyinstaller",
                    bases[i] / "dist",
                    built,
                    bases[i] / "pyinstaller.log",
                    labels[i],
                ),
                range(len(sources)),
            )
        )
    size = sum(p.stat().st_size for p in bundles[0].rglob("*") if p.is_file())
    steps.end(f"{bundles[0]}: {human(size)} unpacked")

    steps.begin("smoke test: the frozen program starts with an empty environment")
    for base, bundle, label in zip(bases, bundles, labels, strict=True):
        say(f"      {label}aysNode --version -> {smoke_test(bundle, base, built)}")
    steps.end()

    outputs: list[dict[str, Path]] = []
    targets = [out, work / "repro" / "bin"]
    steps.begin(f"package {', '.join(envs)}")
    for bundle, target, label in zip(bundles, targets, labels, strict=False):
        written: dict[str, Path] = {}
        for env in envs:
            t0 = time.monotonic()
            path = package.package(bundle, env, version_text(built, env), target, built.epoch)
            written[env] = path
            say(
                f"      {label}{path}: {human(path.stat().st_size)}, "
                f"sha256 {sha256_of(path)} ({time.monotonic() - t0:.1f} s)"
            )
        outputs.append(written)
    steps.end()

    status = 0
    if args.check_repro:
        steps.begin("compare the two builds member by member")
        for env in envs:
            differences = package.compare(outputs[0][env], outputs[1][env])
            if not differences:
                say(f"      {env}: byte-identical ({sha256_of(outputs[0][env])[:16]}...)")
            else:
                status = 1
                say(f"      {env}: NOT reproducible: {len(differences)} difference(s):")
                for line in differences:
                    say(f"        {line}")
        steps.end("reproducible" if status == 0 else "not reproducible")

    say(f"finished in {time.monotonic() - steps.started:.0f} s:")
    for path in outputs[0].values():
        say(f"  {path}  {human(path.stat().st_size)}")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--env",
        action="append",
        metavar="ENV",
        help="build this env only (repeatable; default: every envs/*.yaml)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=CHECKOUT / "build" / "bin",
        help="where the tarballs go (default: build/bin)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=CHECKOUT / "build" / "work",
        help="snapshot, PyInstaller work and dist dirs (default: build/work)",
    )
    parser.add_argument(
        "--check-repro",
        action="store_true",
        help="freeze twice from scratch and compare the tarballs",
    )
    parser.add_argument(
        "--from-commit",
        action="store_true",
        help="build HEAD as committed instead of the working tree",
    )
    args = parser.parse_args(argv)
    try:
        return build(args)
    except BuildError as err:
        say(f"error: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
