"""installConfig's RocketMQ preflight: against the proxy emulator, and from a host that cannot
reach the uat env's proxy (its placeholder host does not resolve here)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from ays_installer.preflight import PreflightFailed, run_preflight
from ays_installer.render import Prepared, prepare
from tests.emulators.rocketmq import RocketMQEmulator

INSTALL_CONFIG = Path(sys.executable).parent / "installConfig"
SECRETS = {
    "AYS_ACCESS_TOKEN": "tok-preflight",
    "AYS_CLUSTER_SECRET": "tok-preflight-cluster",
    "AYS_DB_PASSWORD": "pw-preflight",
    "AYS_CONSUL_TOKEN": "consul-preflight",
    "AYS_ROCKETMQ_SECRET": "rmq-preflight",
}


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    return SECRETS


@pytest.fixture
def emu() -> Iterator[RocketMQEmulator]:
    with RocketMQEmulator(topics=["ays_uat_g1", "ays_uat_result"]) as emulator:
        yield emulator


def _uat_on(emu: RocketMQEmulator, role: str, tmp_path: Path, **given: str) -> Prepared:
    """The uat env as installConfig prepares it, its proxy endpoint moved to the emulator."""
    prepared = prepare("uat", role, root=tmp_path, **given)  # type: ignore[arg-type]
    transport = prepared.config.transport.model_copy(update={"endpoints": [emu.endpoint]})
    config = prepared.config.model_copy(update={"transport": transport})
    return Prepared(prepared.role, config, prepared.source, prepared.secrets)


def test_a_node_whose_topics_all_exist_passes_and_says_what_it_checked(
    emu: RocketMQEmulator, secrets: dict[str, str], tmp_path: Path
) -> None:
    emu.create_topic("ays_uat_g1_bcast")
    lines: list[str] = []
    run_preflight(_uat_on(emu, "node", tmp_path, group="g1"), lines.append)
    text = "\n".join(lines)
    assert f"ok           {emu.endpoint} answers" in text
    for topic in ("ays_uat_g1", "ays_uat_g1_bcast", "ays_uat_result"):
        assert f"ok           topic {topic}" in text
    assert not list(tmp_path.rglob("*")), "the preflight wrote nothing"


def test_a_missing_topic_is_reported_with_the_mqadmin_command_that_creates_it(
    emu: RocketMQEmulator, secrets: dict[str, str], tmp_path: Path
) -> None:
    lines: list[str] = []
    with pytest.raises(PreflightFailed, match="1 RocketMQ topic.*ays_uat_g1_bcast.*mqadmin"):
        run_preflight(_uat_on(emu, "node", tmp_path, group="g1"), lines.append)
    text = "\n".join(lines)
    assert "missing      topic ays_uat_g1_bcast" in text
    assert (
        "mqadmin updateTopic -n <name-server-host>:9876 -c DefaultCluster -t ays_uat_g1_bcast"
        in text
    )
    assert "ok           topic ays_uat_g1" in text


def test_a_manager_checks_the_result_topic_and_says_why_it_cannot_list_node_groups(
    emu: RocketMQEmulator, secrets: dict[str, str], tmp_path: Path
) -> None:
    lines: list[str] = []
    run_preflight(_uat_on(emu, "manager", tmp_path), lines.append)
    text = "\n".join(lines)
    assert "ok           topic ays_uat_result" in text
    assert "node groups could not be read from the database" in text
    assert "ays_uat_G and ays_uat_G_bcast" in text


def test_a_manager_checks_both_topics_of_every_node_group_in_its_database(
    emu: RocketMQEmulator, secrets: dict[str, str], tmp_path: Path, sqlite_url: str
) -> None:
    from sqlalchemy import create_engine, insert

    from ays_runtime.storage.database import utcnow
    from ays_runtime.storage.models import NodeGroup

    engine = create_engine(sqlite_url)
    with engine.begin() as conn:
        now = utcnow()
        conn.execute(insert(NodeGroup), [{"name": "g1", "created_at": now, "updated_at": now}])
    engine.dispose()
    prepared = _uat_on(emu, "manager", tmp_path)
    storage = prepared.config.storage.model_copy(update={"url": SecretStr(sqlite_url)})
    prepared = Prepared(
        prepared.role,
        prepared.config.model_copy(update={"storage": storage}),
        prepared.source,
        prepared.secrets,
    )
    lines: list[str] = []
    with pytest.raises(PreflightFailed, match="ays_uat_g1_bcast"):
        run_preflight(prepared, lines.append)
    assert "ok           topic ays_uat_g1" in "\n".join(lines), lines


def test_a_host_that_cannot_reach_the_proxy_gets_a_clear_error_and_nothing_written(
    tmp_path: Path,
) -> None:
    stage = tmp_path / "stage"
    done = subprocess.run(
        [str(INSTALL_CONFIG), "node", "-e", "uat", "-g", "g1", "--root", str(stage)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **SECRETS},
        timeout=60,
    )
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr + done.stdout
    assert "cannot reach the RocketMQ proxy rocketmq-proxy.uat.example.internal:8081" in (
        done.stderr
    )
    assert "--skip-preflight" in done.stderr
    assert "unreachable  rocketmq-proxy.uat.example.internal:8081" in done.stdout
    assert not stage.exists(), "nothing was written"
    assert not (tmp_path / "logs").exists(), "the client's log did not go to HOME"


def test_skip_preflight_installs_without_asking_the_proxy(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    done = subprocess.run(
        [str(INSTALL_CONFIG), "node", "-e", "uat", "-g", "g1", "--root", str(stage)]
        + ["--skip-preflight"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **SECRETS},
        timeout=60,
    )
    assert done.returncode == 0, done
    assert "preflight:" not in done.stdout
    assert (stage / "etc/ays/node.yaml").is_file()
