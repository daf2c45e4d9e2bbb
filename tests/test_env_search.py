"""Where `-e NAME` finds an environment: ./envs/, then /etc/ays/envs/ (under --root DIR when
given), then the bundled envs; or `-e PATH`. Templates always come from the bundle.

Run in the source checkout's entry point (editable install) and in a non-editable install of
the project built into a folder of its own (pip install --target, no dependencies: they come
from the test's virtualenv). The frozen program is covered in test_tarball.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ays_runtime.config import load_config_file

CHECKOUT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def write_env(path: Path, name: str, port: int) -> Path:
    """A dev-like env file `name` whose manager listens on `port`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(
            {
                "env": name,
                "storage": {"url": "sqlite:///{data_dir}/ays.db"},
                "registry": {"backend": "builtin"},
                "transport": {"backend": "builtin"},
                "manager": {"port": port},
            }
        )
    )
    return path


def install_config(
    program: Path, cwd: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(program), *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def rendered_port(stage: Path) -> int:
    return load_config_file(stage / "etc/ays/manager.yaml").manager.port


def check_the_search_order(program: Path, work: Path, **env: str) -> None:
    """The operator's files win: ./envs/ over /etc/ays/envs/ over the bundled envs."""
    stage = work / "stage"
    bundled = install_config(program, work, "manager", "-e", "dev", "--root", str(stage), **env)
    assert bundled.returncode == 0, bundled.stderr
    assert rendered_port(stage) == 18080
    assert "installConfig from envs/dev.yaml:" in (stage / "etc/ays/manager.yaml").read_text()

    write_env(stage / "etc/ays/envs/dev.yaml", "dev", 18001)
    done = install_config(program, work, "manager", "-e", "dev", "--root", str(stage), **env)
    assert done.returncode == 0, done.stderr
    assert rendered_port(stage) == 18001

    own = write_env(work / "envs/dev.yaml", "dev", 18002)
    done = install_config(program, work, "manager", "-e", "dev", "--root", str(stage), **env)
    assert done.returncode == 0, done.stderr
    assert rendered_port(stage) == 18002
    assert f"installConfig from {own}:" in (stage / "etc/ays/manager.yaml").read_text()

    site = write_env(work / "elsewhere/site.yaml", "site", 18003)
    by_path = install_config(
        program, work, "manager", "-e", "./elsewhere/site.yaml", "--root", str(stage), **env
    )
    assert by_path.returncode == 0, by_path.stderr
    assert rendered_port(stage) == 18003
    assert f"installConfig from {site}:" in (stage / "etc/ays/manager.yaml").read_text()

    unknown = install_config(program, work, "manager", "-e", "nowhere", "--root", str(stage), **env)
    assert unknown.returncode == 2
    assert "unknown environment 'nowhere': known environments are dev, " in unknown.stderr
    assert f"looked for NAME.yaml in {work / 'envs'}, {stage / 'etc/ays/envs'}, " in unknown.stderr


def test_an_env_is_found_in_envs_then_etc_ays_envs_then_the_bundle_or_by_path(
    tmp_path: Path,
) -> None:
    check_the_search_order(BIN / "installConfig", tmp_path)


def test_the_env_search_works_in_a_non_editable_install(tmp_path: Path) -> None:
    """`pip install .` (not editable): the bundled envs and templates come from the installed
    package, the operator's from ./envs/, /etc/ays/envs/ or a path."""
    target = tmp_path / "site"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
            str(target),
            str(CHECKOUT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if built.returncode != 0:
        pytest.fail(f"pip install --target failed:\n{built.stdout}\n{built.stderr}")
    work = tmp_path / "work"
    work.mkdir()
    env = {"PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import ays_installer.resources as r; print(r.resource_root())"],
        cwd=work,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.stdout.strip() == str(target / "ays_installer" / "_resources"), where
    check_the_search_order(target / "bin" / "installConfig", work, **env)
