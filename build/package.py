"""Write one environment's tarball from the frozen bundle, reproducibly; compare two tarballs.

    python build/package.py compare A.tar.gz B.tar.gz   # which members differ, and why

The tarball `<env>_ays.tar.gz` unpacks into `<env>_ays/`:

    ays                     the frozen multicall program (PyInstaller one-dir bootloader)
    _internal/              its bundle (Python, libraries, templates and env files)
    installConfig, aysManager, aysNode    symlinks to `ays` (it dispatches on the name)
    envs, templates         symlinks to the bundle's data dirs, for reading and editing
    INSTALL, VERSION, SHA256SUMS

The bundle is the same for every env except its `envs/`, which holds `dev.yaml` (the embedded
default) and this env's file only.

Reproducible: members in sorted order, uid/gid 0 with empty owner names, one fixed mtime
(SOURCE_DATE_EPOCH, the last commit's time), modes normalised to 0755/0644, and a gzip stream
with mtime 0 and no file name. Two tarballs written from identical inputs are byte-identical;
when they are not, `compare` names every member that differs and, for PyInstaller archives
and zip files inside the bundle, the entries (Python modules) that differ within them.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import stat
import string
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROGRAM = "ays"
PROGRAMS = ("installConfig", "aysManager", "aysNode")
RESOURCES = "_internal/ays_installer/_resources"
EMBEDDED_ENV = "dev"  # the embedded default, in every tarball
INSTALL_TEMPLATE = Path(__file__).resolve().parent / "INSTALL.in"
GZIP_LEVEL = 6  # 9 is 0.3% smaller and three times slower
# A ${VAR} secret placeholder of an env file (as ays_runtime.config reads them; the build
# tools do not import the package they build).
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Member:
    """One entry of the tarball: a directory, a file (from disk or from memory) or a link."""

    name: str  # relative to the top directory; "" is the top directory itself
    kind: str  # "dir", "file" or "symlink"
    mode: int = 0o644
    source: Path | None = None
    data: bytes | None = None
    target: str = ""

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.source is not None
        return self.source.read_bytes()


def tarball_name(env: str) -> str:
    return f"{env}_ays.tar.gz"


def _bundle_members(bundle: Path, env: str) -> Iterator[Member]:
    """The frozen bundle's files, except the env files of other environments."""
    keep_envs = {f"{EMBEDDED_ENV}.yaml", f"{env}.yaml"}
    for path in sorted(bundle.rglob("*")):
        name = path.relative_to(bundle).as_posix()
        if name.startswith(f"{RESOURCES}/envs/") and path.name not in keep_envs:
            continue
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            yield Member(name, "symlink", 0o777, target=os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            yield Member(name, "dir", 0o755)
        elif stat.S_ISREG(info.st_mode):
            mode = 0o755 if info.st_mode & 0o111 else 0o644
            yield Member(name, "file", mode, source=path)
        else:
            raise ValueError(f"{path}: neither a file, a directory nor a symlink")


def _sha256sums(members: list[Member]) -> bytes:
    """`sha256sum -c SHA256SUMS` format, for every regular file (run it in the top dir)."""
    lines = [
        f"{hashlib.sha256(m.read()).hexdigest()}  {m.name}\n"
        for m in sorted(members, key=lambda m: m.name)
        if m.kind == "file"
    ]
    return "".join(lines).encode()


def _install_text(env: str, env_file: Path) -> bytes:
    """INSTALL for `env`, naming the secrets its env file reads from the environment."""
    template = string.Template(INSTALL_TEMPLATE.read_text(encoding="utf-8"))
    names = list(dict.fromkeys(PLACEHOLDER.findall(env_file.read_text(encoding="utf-8"))))
    if names:
        secret_line = "export " + " ".join(f"{name}=..." for name in names)
    else:
        secret_line = f"# (envs/{env}.yaml reads no secret from the environment)"
    return template.substitute(
        env=env,
        top=f"{env}_ays",
        tarball=tarball_name(env),
        secret_names=",".join(names) or "NAME,...",
        secret_line=secret_line,
    ).encode()


def plan(bundle: Path, env: str, version_text: str) -> list[Member]:
    """Every member of `env`'s tarball, sorted by name (the top directory first)."""
    if not (bundle / PROGRAM).is_file():
        raise FileNotFoundError(f"{bundle / PROGRAM}: no frozen program (run the freeze first)")
    if not (bundle / RESOURCES / "envs" / f"{env}.yaml").is_file():
        raise FileNotFoundError(f"{bundle / RESOURCES / 'envs'}: the bundle has no {env}.yaml")
    members = list(_bundle_members(bundle, env))
    members += [Member(name, "symlink", 0o777, target=PROGRAM) for name in PROGRAMS]
    members += [
        Member("envs", "symlink", 0o777, target=f"{RESOURCES}/envs"),
        Member("templates", "symlink", 0o777, target=f"{RESOURCES}/templates"),
        Member(
            "INSTALL", "file", data=_install_text(env, bundle / RESOURCES / "envs" / f"{env}.yaml")
        ),
        Member("VERSION", "file", data=version_text.encode()),
    ]
    members.append(Member("SHA256SUMS", "file", data=_sha256sums(members)))
    members.append(Member("", "dir", 0o755))
    return sorted(members, key=lambda m: m.name)


def _tarinfo(top: str, member: Member, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(f"{top}/{member.name}" if member.name else top)
    info.mode = member.mode
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if member.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif member.kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = member.target
    return info


def write_tarball(members: list[Member], top: str, out: Path, mtime: int) -> Path:
    """Write `out` atomically (a temp file renamed into place)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    try:
        with (
            open(partial, "wb") as raw,
            gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL
            ) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for member in members:
                info = _tarinfo(top, member, mtime)
                if member.kind == "file":
                    data = member.read()
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                else:
                    tar.addfile(info)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def package(bundle: Path, env: str, version_text: str, out_dir: Path, mtime: int) -> Path:
    members = plan(bundle, env, version_text)
    return write_tarball(members, f"{env}_ays", out_dir / tarball_name(env), mtime)


# --- comparing two tarballs -----------------------------------------------------------------


HEADER_FIELDS = ("type", "mode", "uid", "gid", "uname", "gname", "mtime", "linkname")


@dataclass(frozen=True)
class Entry:
    header: dict[str, object]  # HEADER_FIELDS of the tar header
    sha256: str
    data: bytes


def read_members(path: Path) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    with tarfile.open(path, "r:gz") as tar:
        for info in tar:
            data = b""
            if info.isfile():
                extracted = tar.extractfile(info)
                assert extracted is not None
                data = extracted.read()
            header = {field: getattr(info, field) for field in HEADER_FIELDS}
            entries[info.name] = Entry(header, hashlib.sha256(data).hexdigest(), data)
    return entries


def _inner_differences(a: bytes, b: bytes) -> list[str]:
    """Which entries of an archive member differ: a PyInstaller executable's PKG (and its
    PYZ of Python modules), or a zip file such as base_library.zip."""
    if a[:4] == b"PK\x03\x04":
        za, zb = zipfile.ZipFile(io.BytesIO(a)), zipfile.ZipFile(io.BytesIO(b))
        left = {i.filename: (i.CRC, i.date_time) for i in za.infolist()}
        right = {i.filename: (i.CRC, i.date_time) for i in zb.infolist()}
        return [
            f"zip entry {n}"
            for n in sorted(left.keys() | right.keys())
            if left.get(n) != right.get(n)
        ]
    if a[:4] == b"\x7fELF":
        return _pyinstaller_differences(a, b)
    return []


def _pyinstaller_differences(a: bytes, b: bytes) -> list[str]:
    try:
        from PyInstaller.archive.readers import CArchiveReader, NotAnArchiveError
    except ImportError:
        return ["(PyInstaller is not importable here: cannot look inside the executable)"]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for side, data in (("a", a), ("b", b)):
            path = Path(tmp) / side
            path.write_bytes(data)
            paths.append(str(path))
        try:
            pkgs = [CArchiveReader(p) for p in paths]
        except (NotAnArchiveError, ValueError, OSError):
            return []  # a plain shared library
        found = []
        names = sorted(pkgs[0].toc.keys() | pkgs[1].toc.keys())
        for entry in names:
            if entry not in pkgs[0].toc or entry not in pkgs[1].toc:
                found.append(f"PKG entry {entry} is in one build only")
                continue
            if pkgs[0].extract(entry) == pkgs[1].extract(entry):
                continue
            if pkgs[0].toc[entry][-1] == "z":  # the PYZ of Python modules
                pyz = [pkg.open_embedded_archive(entry) for pkg in pkgs]
                modules = sorted(pyz[0].toc.keys() | pyz[1].toc.keys())
                found += [
                    f"module {m} (in {entry})"
                    for m in modules
                    if m not in pyz[0].toc
                    or m not in pyz[1].toc
                    or pyz[0].extract(m, raw=True) != pyz[1].extract(m, raw=True)
                ]
            else:
                found.append(f"PKG entry {entry}")
        return found


def compare(a_path: Path, b_path: Path) -> list[str]:
    """One line per difference between two tarballs; empty when they are byte-identical."""
    if a_path.read_bytes() == b_path.read_bytes():
        return []
    a, b = read_members(a_path), read_members(b_path)
    lines = []
    for name in sorted(a.keys() | b.keys()):
        if name not in b or name not in a:
            lines.append(f"{name}: only in {a_path if name in a else b_path}")
            continue
        left, right = a[name], b[name]
        fields = [f for f in HEADER_FIELDS if left.header[f] != right.header[f]]
        if fields:
            changes = ", ".join(f"{f} {left.header[f]!r} vs {right.header[f]!r}" for f in fields)
            lines.append(f"{name}: tar header differs: {changes}")
        if left.sha256 != right.sha256:
            why = _inner_differences(left.data, right.data)
            shown = "; ".join(why[:20]) + (f"; ... {len(why) - 20} more" if len(why) > 20 else "")
            lines.append(
                f"{name}: content differs (sha256 {left.sha256[:12]}, {len(left.data)} bytes vs "
                f"{right.sha256[:12]}, {len(right.data)} bytes)" + (f": {shown}" if shown else "")
            )
    if not lines:
        lines.append("every member is identical: the tar or gzip framing differs")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmp_parser = sub.add_parser("compare", help="name the members that differ between two tarballs")
    cmp_parser.add_argument("a", type=Path)
    cmp_parser.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    differences = compare(args.a, args.b)
    if not differences:
        print(f"identical: {args.a} and {args.b}")
        return 0
    print(f"{args.a} and {args.b} differ:")
    for line in differences:
        print(f"  {line}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
