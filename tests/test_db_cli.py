"""`aysManager db upgrade`, run as the operator runs it: a real process, a config file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from sqlalchemy.engine import make_url

from ays_runtime.storage.migrate import current_revision, head_revision

AYS_MANAGER = Path(sys.executable).parent / "aysManager"


def write_config(folder: Path, storage_url: str) -> Path:
    """A valid config file, as installConfig would render it, using `storage_url`."""
    config = {
        "env": "dev",
        "storage": {"url": storage_url},
        "registry": {"backend": "builtin"},
        "transport": {"backend": "builtin"},
        "manager": {
            "conf_dir": str(folder / "conf"),
            "log_dir": str(folder / "log"),
            "data_dir": str(folder / "data"),
        },
    }
    path = folder / "ays-manager.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    path.chmod(0o600)
    return path


def manager_command(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(AYS_MANAGER), *args, "--config", str(config)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def db_upgrade(config: Path) -> subprocess.CompletedProcess[str]:
    return manager_command(config, "db", "upgrade")


def reconcile_dry_run(config: Path) -> subprocess.CompletedProcess[str]:
    return manager_command(config, "reconcile", "--dry-run")


def test_db_upgrade_migrates_a_new_sqlite_database_and_names_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'ays.db'}"

    result = db_upgrade(write_config(tmp_path, "sqlite:///{data_dir}/ays.db"))

    assert result.returncode == 0, result.stderr
    assert f"database {url}" in result.stdout
    assert current_revision(url) == head_revision()


def test_db_upgrade_run_twice_succeeds_twice(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'ays.db'}")

    first, second = db_upgrade(config), db_upgrade(config)

    assert (first.returncode, second.returncode) == (0, 0), second.stderr


def test_db_upgrade_with_a_wrong_mysql_password_says_so_without_printing_it(
    tmp_path: Path, mysql_server_url: str
) -> None:
    url = make_url(mysql_server_url).set(password="Wr0ng-Pa55word")

    result = db_upgrade(write_config(tmp_path, url.render_as_string(hide_password=False)))

    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"database {url.render_as_string(hide_password=True)}: cannot connect" in result.stderr
    assert "password" in result.stderr  # the fix names what to check
    assert "Wr0ng-Pa55word" not in output
    assert "Traceback" not in output


def test_db_upgrade_against_a_server_that_does_not_answer_fails_cleanly(tmp_path: Path) -> None:
    url = "mysql+pymysql://ays:S3cret-x@127.0.0.1:1/ays"

    result = db_upgrade(write_config(tmp_path, url))

    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "database mysql+pymysql://ays:***@127.0.0.1:1/ays: cannot connect" in result.stderr
    assert "S3cret-x" not in output
    assert "Traceback" not in output


def test_reconcile_dry_run_with_an_unreachable_database_says_so_in_one_line(
    tmp_path: Path,
) -> None:
    result = reconcile_dry_run(
        write_config(tmp_path, "mysql+pymysql://ays:S3cret-x@127.0.0.1:1/ays")
    )

    assert result.returncode != 0
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "error: database mysql+pymysql://ays:***@127.0.0.1:1/ays: cannot connect"
    )
    assert "start it, or fix host/port in storage.url" in line
    assert "S3cret-x" not in result.stderr


def test_reconcile_dry_run_on_a_database_never_migrated_says_how_to_migrate_it(
    tmp_path: Path,
) -> None:
    result = reconcile_dry_run(write_config(tmp_path, f"sqlite:///{tmp_path / 'new.db'}"))

    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert "has no Ays schema yet: run aysManager db upgrade" in line


def test_reconcile_dry_run_on_a_migrated_database_lists_the_actions(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'ays.db'}")
    assert db_upgrade(config).returncode == 0

    result = reconcile_dry_run(config)

    assert result.returncode == 0, result.stderr
    assert "0 action(s); nothing was changed" in result.stdout
