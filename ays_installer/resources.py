"""Where the templates and env files are, in every form Ays runs in.

The bundled resources: a wheel and a PyInstaller bundle carry them as
`ays_installer/_resources/{templates,envs}` (see pyproject.toml and build/ays.spec); a source
checkout has them at the top of the tree. `AYS_RESOURCES=DIR` replaces the bundled ones with
DIR's `templates/` and `envs/` (an edited copy of both).

Templates always come from the bundled resources. An environment named with `-e NAME` is
the first `NAME.yaml` found in (the operator's own files win over the bundled ones):

    1. ./envs/                  the current directory's envs folder
    2. /etc/ays/envs/           the host's (under DIR with --root DIR, as every other path)
    3. the bundled envs         dev.yaml, uat.yaml, prod.yaml (a tarball: dev and its own)

`-e PATH` (it holds a `/`, or ends in .yaml/.yml) names the file itself, e.g.
`-e ./envs/site.yaml`. Either way the file's `env:` field must equal its name.
"""

from __future__ import annotations

import os
from pathlib import Path

from ays_runtime.config import ENV_NAME, EnvConfig, load_config_file
from ays_runtime.exceptions import ConfigError

_PACKAGED = Path(__file__).resolve().parent / "_resources"
_CHECKOUT = Path(__file__).resolve().parent.parent
SYSTEM_ENVS = "/etc/ays/envs"


def resource_root() -> Path:
    override = os.environ.get("AYS_RESOURCES")
    if override:
        return Path(override)
    if (_PACKAGED / "templates").is_dir():
        return _PACKAGED
    return _CHECKOUT


def templates_dir() -> Path:
    return resource_root() / "templates"


def envs_dir() -> Path:
    """The bundled env files."""
    return resource_root() / "envs"


def env_dirs(root: Path | None = None) -> list[Path]:
    """Where `-e NAME` looks, first match wins (see the module docstring). A ./envs/ that is
    the bundled folder itself (a checkout's top, a tarball's `envs` link) counts as bundled:
    it comes last, after the operator's /etc/ays/envs/."""
    system = Path(SYSTEM_ENVS) if root is None else Path(root) / SYSTEM_ENVS.lstrip("/")
    bundled = envs_dir()
    own = [folder for folder in (Path.cwd() / "envs", system) if not _same(folder, bundled)]
    found: list[Path] = []
    for folder in (*own, bundled):
        if not any(_same(folder, seen) for seen in found):
            found.append(folder)
    return found


def known_envs(root: Path | None = None) -> list[str]:
    names = {p.stem for folder in env_dirs(root) for p in folder.glob("*.yaml")}
    return sorted(name for name in names if ENV_NAME.match(name))


def is_env_path(value: str) -> bool:
    """`-e` names a file rather than an environment."""
    return "/" in value or value.endswith((".yaml", ".yml"))


def env_file(value: str, root: Path | None = None) -> Path:
    """The env file `-e value` means: a path, or NAME.yaml in the first of `env_dirs()` that
    has it. Raises ConfigError listing the known environments and where they were looked for."""
    if is_env_path(value):
        path = Path(value)
        if not path.is_file():
            raise ConfigError(
                f"-e {value}: no such env file; give an existing file, or an environment "
                f"name: {_known_and_where(root)}"
            )
        return path
    if ENV_NAME.match(value):
        for folder in env_dirs(root):
            path = folder / f"{value}.yaml"
            if path.is_file():
                return path
    raise ConfigError(f"unknown environment {value!r}: {_known_and_where(root)}")


def env_name(path: Path) -> str:
    return path.name.rsplit(".", 1)[0]


def load_env(value: str, root: Path | None = None) -> EnvConfig:
    """Load the env `-e value` names; its `env:` field must equal the file's name."""
    path = env_file(value, root)
    config = load_config_file(path)
    name = env_name(path)
    if config.env != name:
        raise ConfigError(
            f"{path}: field env: is {config.env!r}, must equal the file name {name!r}"
        )
    return config


def _known_and_where(root: Path | None) -> str:
    known = ", ".join(known_envs(root)) or "(none)"
    where = ", ".join(str(folder) for folder in env_dirs(root))
    return f"known environments are {known} (looked for NAME.yaml in {where})"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
