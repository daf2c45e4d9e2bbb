"""Where the templates and env files are, in every form Ays runs in.

A wheel and a PyInstaller bundle carry them as `ays_installer/_resources/{templates,envs}`
(see pyproject.toml and build/ays.spec); a source checkout has them at the top of the tree.
`AYS_RESOURCES` overrides both, which lets an operator point at an edited copy.
"""

from __future__ import annotations

import os
from pathlib import Path

from ays_runtime.config import ENV_NAME, EnvConfig, load_config_file
from ays_runtime.exceptions import ConfigError

_PACKAGED = Path(__file__).resolve().parent / "_resources"
_CHECKOUT = Path(__file__).resolve().parent.parent


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
    return resource_root() / "envs"


def known_envs() -> list[str]:
    return sorted(p.stem for p in envs_dir().glob("*.yaml"))


def env_file(name: str) -> Path:
    return envs_dir() / f"{name}.yaml"


def load_env(name: str) -> EnvConfig:
    """Load `envs/NAME.yaml`, failing with the list of known envs for an unknown name."""
    path = env_file(name)
    if not ENV_NAME.match(name) or not path.is_file():
        known = ", ".join(known_envs()) or "(none)"
        raise ConfigError(f"unknown environment {name!r}: known environments are {known}")
    config = load_config_file(path)
    if config.env != name:
        raise ConfigError(
            f"{path}: field env: is {config.env!r}, must equal the file name {name!r}"
        )
    return config
