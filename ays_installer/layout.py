"""Where an installed service's files are, with or without `--root`.

    /opt/ays/<service>/<Program>         the program: a launcher script (pip/venv install) or
                                         a link into releases/<stamp>/ (PyInstaller bundle)
    /etc/systemd/system/<service>.service
    /etc/init.d/<service>                the LSB init script (`service NAME ...` without systemd)
    <conf_dir>/<role>.yaml               the config installConfig renders (the source of truth:
                                         address, group, directories, user)

`--root DIR` stages all of it under DIR. installConfig `--root` prefixes the config's
directories with DIR too, so a staged install is self-contained: its unit and init script
name the staged paths, and the lifecycle commands with the same `--root` run it under own
supervision (never through systemctl).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ays_installer.resources import env_file
from ays_runtime.config import (
    EnvConfig,
    ManagerSettings,
    NodeSettings,
    load_config_file,
    read_yaml,
)
from ays_runtime.exceptions import ConfigError
from ays_runtime.service.layout import PROGRAM_NAMES, SERVICE_NAMES, Role, ServiceFiles

INSTALL_ROOT = "/opt/ays"
UNIT_DIR = "/etc/systemd/system"
INIT_DIR = "/etc/init.d"
DEFAULT_ENV = "dev"


def staged(root: Path | None, path: str | Path) -> Path:
    """`path` under `root` (as installConfig --root stages it), or `path` itself."""
    if root is None:
        return Path(path)
    return Path(os.path.normpath(os.path.join(os.path.abspath(root), str(path).lstrip("/"))))


def default_config_path(role: Role, env: str | None, root: Path | None) -> Path:
    """Where installConfig ROLE -e ENV [--root DIR] writes the role's config. Only the env
    file's conf_dir is read (no ${VAR} is expanded: no secret is needed to find a file)."""
    path = env_file(env or DEFAULT_ENV, root)
    data = read_yaml(path)
    section = data.get(role) if isinstance(data, dict) else None
    model = ManagerSettings if role == "manager" else NodeSettings
    conf_dir = model.model_fields["conf_dir"].default
    if isinstance(section, dict) and isinstance(section.get("conf_dir"), str):
        conf_dir = section["conf_dir"]
    return staged(root, conf_dir) / f"{role}.yaml"


def installconfig_command(role: Role, env: str | None, root: Path | None, extra: str = "") -> str:
    """The installConfig command that renders the role's config, for messages."""
    parts = ["installConfig", role, "-e", env or DEFAULT_ENV]
    if extra:
        parts.append(extra)
    if root is not None:
        parts += ["--root", str(root)]
    return " ".join(parts)


@dataclass(frozen=True)
class Installation:
    """One role's service, installed or to be installed, at `root` (None: the real /)."""

    role: Role
    root: Path | None
    config_path: Path

    @classmethod
    def locate(
        cls, role: Role, env: str | None, config: Path | None, root: Path | None
    ) -> Installation:
        if env and config:
            raise ConfigError("give either -e ENV or --config FILE, not both")
        path = config if config is not None else default_config_path(role, env, root)
        return cls(role, root, path.absolute())

    @property
    def service(self) -> str:
        return SERVICE_NAMES[self.role]

    @property
    def program_name(self) -> str:
        return PROGRAM_NAMES[self.role]

    @property
    def staged(self) -> bool:
        return self.root is not None

    @property
    def install_dir(self) -> Path:
        return staged(self.root, f"{INSTALL_ROOT}/{self.service}")

    @property
    def program(self) -> Path:
        return self.install_dir / self.program_name

    @property
    def unit_path(self) -> Path:
        return staged(self.root, f"{UNIT_DIR}/{self.service}.service")

    @property
    def init_script(self) -> Path:
        return staged(self.root, f"{INIT_DIR}/{self.service}")

    @property
    def installed(self) -> bool:
        return self.unit_path.exists() or self.init_script.exists() or self.program.exists()

    def load_config(self) -> EnvConfig:
        """The rendered config; ConfigError naming the installConfig command when missing."""
        if not self.config_path.is_file():
            extra = "-g GROUP -p IP -P PORT" if self.role == "node" else "-p IP -P PORT"
            command = installconfig_command(self.role, "ENV", self.root, extra)
            raise ConfigError(
                f"{self.config_path}: no such file; render the {self.role}'s config first "
                f"({command}), or name it with --config FILE"
            )
        return load_config_file(self.config_path)

    def files(self, config: EnvConfig) -> ServiceFiles:
        return ServiceFiles(self.role, config)
