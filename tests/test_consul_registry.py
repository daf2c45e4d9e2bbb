"""The Consul registry end to end: real manager and node processes, the Consul emulator
(with ACLs on), driven and inspected through py-consul as an operator would."""

from __future__ import annotations

import base64
import json
import signal
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import consul
import httpx
import psutil
import pytest
import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from ays_installer import consul_watch
from ays_installer.install_config import app as install_config_app
from ays_runtime.config import ConsulRegistrySettings
from ays_runtime.exceptions import RegistryError
from ays_runtime.manager.registry_api import WATCH_PATH
from ays_runtime.registry.consul import (
    ConsulClient,
    NodeEntry,
    add_to_nodelist,
    decode_nodelist,
    encode_nodelist,
    remove_from_nodelist,
    service_id,
)
from ays_runtime.storage.database import make_engine
from ays_runtime.storage.models import JobLog
from tests.daemons import (
    BIN,
    TOKEN,
    Daemon,
    assert_each_outage_logged_once,
    client,
    free_port,
    manager,
    node,
    wait_for,
)
from tests.daemons import write_config as write_builtin_config
from tests.emulators.consul import ConsulEmulator

CONSUL_TOKEN = "consul-acl-0d6e7a1b-for-tests"
PREFIX = "ays/test"
KEY = f"{PREFIX}/nodelist"
CHECK_INTERVAL = 1.0
OUTAGE = "keeping the last known node states"
BACK = "answers again after"
START_TIMEOUT = 45  # seconds for a daemon to answer: generous, CI machines are shared


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
def emu() -> Iterator[ConsulEmulator]:
    emulator = ConsulEmulator(token=CONSUL_TOKEN).start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def kv(emu: ConsulEmulator) -> Iterator[consul.Consul]:
    """py-consul on the emulator with the ACL token: what an operator's script would use."""
    operator = consul.Consul(host="127.0.0.1", port=emu.port, token=CONSUL_TOKEN)
    yield operator
    operator.http.session.close()


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def storage_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


def settings(emu: ConsulEmulator, **changes: Any) -> ConsulRegistrySettings:
    return ConsulRegistrySettings.model_validate(
        {
            "backend": "consul",
            "host": "127.0.0.1",
            "port": emu.port,
            "token": CONSUL_TOKEN,
            "kv_prefix": PREFIX,
            "check_interval": CHECK_INTERVAL,
            "check_timeout": 1,
            "deregister_after": 60,
            "datacenter": "dc1",  # as uat and prod name it
            **changes,
        }
    )


def write_config(
    path: Path,
    storage_url: str,
    manager_port: int,
    data_dir: Path,
    emu: ConsulEmulator,
    **registry: Any,
) -> Path:
    """A test env config: storage as given, registry consul on the emulator, transport builtin."""
    write_builtin_config(path, storage_url, manager_port, data_dir, node={"max_concurrent_jobs": 4})
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["registry"] = settings(emu, **registry).model_dump(mode="json") | {"token": CONSUL_TOKEN}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@dataclass
class Cluster:
    tmp: Path
    emu: ConsulEmulator
    storage_url: str
    config: Path
    manager_port: int
    manager: Daemon
    nodes: dict[str, Daemon] = field(default_factory=dict)
    node_ports: dict[str, int] = field(default_factory=dict)

    def api(self) -> httpx.Client:
        return client(self.manager_port)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.node_ports[name]}"

    def node(self, name: str, config: Path | None = None) -> Daemon:
        if name in self.nodes:
            self.nodes[name].kill()  # the process before this one: gone, its log closed
        port = self.node_ports.setdefault(name, free_port())
        log_path = self.tmp / f"{name}-{time.monotonic_ns()}.log"
        daemon = node(config or self.config, log_path, "g1", port)
        self.nodes[name] = daemon
        return daemon

    def nodes_by_address(self) -> dict[str, dict[str, Any]]:
        with self.api() as api:
            items = api.get("/nodes", params={"limit": 500}).json()["items"]
        return {f"{n['ip']}:{n['port']}": n for n in items}

    def status(self, name_or_address: str) -> str | None:
        address = self.node_ports.get(name_or_address) and self.address(name_or_address)
        found = self.nodes_by_address().get(address or name_or_address)
        return found["status"] if found else None

    def wait_status(self, name: str, status: str, timeout: float = 15) -> float:
        """Seconds it took for `name` to reach `status` in ays_node."""
        started = time.monotonic()
        wait_for(lambda: self.status(name) == status, timeout, f"node {name} {status}", 0.05)
        return time.monotonic() - started


@pytest.fixture
def make_cluster(tmp_path: Path, emu: ConsulEmulator) -> Iterator[Callable[..., Cluster]]:
    """make_cluster(storage_url, *node_names): a manager, node group g1, the nodes online."""
    made: list[Cluster] = []

    def make(storage_url: str, *names: str, **registry: Any) -> Cluster:
        port = free_port()
        config = write_config(tmp_path / "ays.yaml", storage_url, port, tmp_path, emu, **registry)
        ays = Cluster(
            tmp_path,
            emu,
            storage_url,
            config,
            port,
            manager(config, tmp_path / "manager.log", port),
        )
        made.append(ays)
        ays.manager.start(START_TIMEOUT)
        with ays.api() as api:
            assert api.post("/node-groups", json={"name": "g1"}).status_code == 201
        for name in names:
            ays.node(name)
        start_all([ays.nodes[name] for name in names])
        for name in names:
            ays.wait_status(name, "online")
        return ays

    yield make
    for ays in made:
        for daemon in ays.nodes.values():
            daemon.kill()
        ays.manager.kill()
    _kill_marked(str(tmp_path))


def start_all(daemons: list[Daemon]) -> None:
    """Start the processes at the same moment, then wait for each to answer."""
    errors: list[BaseException] = []

    def start(daemon: Daemon) -> None:
        try:
            daemon.start(START_TIMEOUT)
        except BaseException as err:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=start, args=(d,)) for d in daemons]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(START_TIMEOUT + 10)
    if errors:
        raise errors[0]


def _kill_marked(marker: str) -> None:
    """Jobs of a SIGKILLed node outlive it: clean them up. The marker is the test's full
    tmp path: its base name alone is the same in another pytest session running at once."""
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or []):
            proc.kill()


def listed(kv: consul.Consul) -> list[dict[str, Any]]:
    _, entry = kv.kv.get(KEY)
    return json.loads(entry["Value"]) if entry else []


def edit_nodelist(kv: consul.Consul, change: Callable[[list[dict[str, Any]]], None]) -> None:
    """What an operator does by hand: read, edit, write back with ?cas (retry on a race)."""
    for _ in range(20):
        _, entry = kv.kv.get(KEY)
        entries = json.loads(entry["Value"]) if entry else []
        change(entries)
        if kv.kv.put(KEY, json.dumps(entries), cas=entry["ModifyIndex"] if entry else 0):
            return
    raise AssertionError(f"could not write {KEY}")


def add_task(ays: Cluster, command: str, **fields: Any) -> int:
    body = {
        "name": f"t-{uuid.uuid4().hex[:8]}",
        "node_group": "g1",
        "schedule": "0 0 0 1 1 *",  # yearly: triggered by hand unless given
        "task_type": "shell",
        "payload": {"command": command},
        **fields,
    }
    with ays.api() as api:
        response = api.post("/tasks", json=body)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def trigger(ays: Cluster, task: int) -> int:
    with ays.api() as api:
        response = api.post(f"/tasks/{task}/trigger", json={})
    assert response.status_code == 202, response.text
    return int(response.json()["job_log_id"])


def runs(ays: Cluster, task: int) -> list[dict[str, Any]]:
    with ays.api() as api:
        items = api.get("/job-logs", params={"task_id": task, "limit": 100}).json()["items"]
    return sorted(items, key=lambda r: r["id"])


# -- the node list in KV -------------------------------------------------------------------


def test_the_node_list_is_sorted_json_and_a_bad_entry_is_named_with_its_key() -> None:
    entries = [
        NodeEntry(ip="10.0.0.9", port=18181, node_group="g1", source="self"),
        NodeEntry(ip="10.0.0.10", port=18181, node_group="g2"),
    ]
    text = encode_nodelist(entries)
    assert json.loads(text) == [
        {"ip": "10.0.0.9", "port": 18181, "node_group": "g1", "source": "self"},
        {"ip": "10.0.0.10", "port": 18181, "node_group": "g2", "source": "manual"},
    ]
    assert decode_nodelist(KEY, text) == entries
    assert encode_nodelist(list(reversed(entries))) == text, "same list, same bytes"
    assert decode_nodelist(KEY, None) == [] and decode_nodelist(KEY, b"  ") == []
    assert ":" not in KEY
    with pytest.raises(RegistryError, match=r"ays/test/nodelist: entry 1 .*port"):
        decode_nodelist(
            KEY,
            '[{"ip": "10.0.0.1", "port": 1, "node_group": "g"}, '
            '{"ip": "10.0.0.2", "port": 0, "node_group": "g"}]',
        )
    with pytest.raises(RegistryError, match="not a list"):
        decode_nodelist(KEY, '{"ip": "10.0.0.1"}')


def test_concurrent_check_and_set_adds_lose_no_entry_and_repeat_adds_change_nothing(
    emu: ConsulEmulator, kv: consul.Consul
) -> None:
    config = settings(emu)
    entries = [
        NodeEntry(ip=f"10.0.0.{i}", port=18181, node_group="g1", source="self")
        for i in range(1, 13)
    ]
    barrier = threading.Barrier(len(entries))
    errors: list[BaseException] = []

    def join(entry: NodeEntry) -> None:
        try:
            with ConsulClient(config) as consul_client:
                barrier.wait(5)
                add_to_nodelist(consul_client, KEY, entry)
        except BaseException as err:  # noqa: BLE001 - reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=join, args=(e,)) for e in entries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert sorted(e["ip"] for e in listed(kv)) == sorted(e.ip for e in entries)

    _, before = kv.kv.get(KEY)
    with ConsulClient(config) as consul_client:
        assert add_to_nodelist(consul_client, KEY, entries[0]) is False
        assert remove_from_nodelist(consul_client, KEY, "10.9.9.9", 1) is False
        assert remove_from_nodelist(consul_client, KEY, "10.0.0.1", 18181) is True
    _, after = kv.kv.get(KEY)
    assert len(listed(kv)) == len(entries) - 1
    assert after["ModifyIndex"] > before["ModifyIndex"]


def test_a_wrong_acl_token_is_a_registry_error_that_names_the_fix(emu: ConsulEmulator) -> None:
    with ConsulClient(settings(emu, token="not-the-token")) as consul_client:
        with pytest.raises(RegistryError, match="permission denied.*registry.token") as caught:
            consul_client.kv_get(KEY)
    assert "not-the-token" not in str(caught.value)


# -- nodes and manager as processes ----------------------------------------------------------


def test_two_nodes_starting_at_once_are_each_listed_once_and_registered(
    make_cluster: Callable[..., Cluster], sqlite_url: str, kv: consul.Consul
) -> None:
    ays = make_cluster(sqlite_url, "a", "b")

    entries = listed(kv)
    assert sorted((e["ip"], e["port"]) for e in entries) == sorted(
        ("127.0.0.1", ays.node_ports[n]) for n in ("a", "b")
    )
    assert {(e["node_group"], e["source"]) for e in entries} == {("g1", "self")}
    _, instances = kv.health.service("aysnode")
    by_id = {i["Service"]["ID"]: i["Service"] for i in instances}
    config = settings(ays.emu)
    for name in ("a", "b"):
        service = by_id[service_id(config, "127.0.0.1", ays.node_ports[name])]
        assert service["Tags"] == ["g1"] and service["Meta"]["node_group"] == "g1"
        assert service["Meta"]["version"] and service["Port"] == ays.node_ports[name]
    rows = ays.nodes_by_address()
    for name in ("a", "b"):
        row = rows[ays.address(name)]
        assert (row["status"], row["source"], row["node_group"]) == ("online", "self", "g1")
        assert row["last_seen"]
        registration = httpx.get(ays.nodes[name].health_url).json()["registration"]
        assert registration["registry"] == "consul", registration
        assert registration["target"] == f"http://127.0.0.1:{ays.emu.port}"
        assert registration["state"] == "joined" and registration["last_ok_at"], registration


def test_a_killed_node_is_offline_within_the_check_interval_its_runs_node_lost_and_it_returns(
    make_cluster: Callable[..., Cluster], storage_url: str
) -> None:
    ays = make_cluster(storage_url, "a", "b")
    task = add_task(ays, f"sleep 30 # {ays.tmp}")
    trigger(ays, task)
    run = wait_for(
        lambda: [r for r in runs(ays, task) if r["status"] == "running"], 10, "a running run"
    )[0]
    victim = next(n for n in ("a", "b") if ays.address(n) == run["node"])

    ays.nodes[victim].proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    took = ays.wait_status(victim, "offline", timeout=10)

    # A few check intervals, not the 30 s of a TTL: bounded generously for a loaded machine.
    assert took <= CHECK_INTERVAL + 6, f"offline after {took:.2f}s"
    lost = wait_for(
        lambda: [r for r in runs(ays, task) if r["status"] == "node_lost"],
        10,
        "the run failed as node lost",
    )[0]
    assert lost["id"] == run["id"] and lost["node"] == run["node"]
    other = "b" if victim == "a" else "a"
    assert ays.status(other) == "online"

    ays.node(victim).start(START_TIMEOUT)
    ays.wait_status(victim, "online", timeout=10)


def test_the_manager_follows_the_node_list_edited_in_kv(
    make_cluster: Callable[..., Cluster], sqlite_url: str, kv: consul.Consul
) -> None:
    ays = make_cluster(sqlite_url, "a", "b")
    ghost = free_port()  # listed by hand, no process: known, never online

    edit_nodelist(
        kv,
        lambda entries: entries.append(
            {"ip": "127.0.0.1", "port": ghost, "node_group": "g1", "source": "manual"}
        ),
    )
    row = wait_for(lambda: ays.nodes_by_address().get(f"127.0.0.1:{ghost}"), 10, "ghost row")
    assert (row["status"], row["source"], row["node_group"]) == ("unknown", "manual", "g1")

    gone = ays.node_ports["b"]
    edit_nodelist(kv, lambda entries: entries.remove(next(e for e in entries if e["port"] == gone)))
    ays.wait_status("b", "offline", timeout=10)
    assert ays.status("a") == "online"
    task = add_task(ays, "true", route_strategy="round_robin")
    for _ in range(4):
        trigger(ays, task)
    done = wait_for(
        lambda: [r for r in runs(ays, task) if r["status"] == "succeeded"][3:] and runs(ays, task),
        20,
        "four runs",
    )
    assert {r["node"] for r in done} == {ays.address("a")}
    assert f"node {ays.address('b')} left the node list" in ays.manager.log()


def test_a_node_listed_in_kv_or_added_by_hand_in_an_unknown_group_creates_the_group(
    make_cluster: Callable[..., Cluster], database_url: str, kv: consul.Consul
) -> None:
    ays = make_cluster(database_url)
    ghost = free_port()
    edit_nodelist(
        kv,
        lambda entries: entries.append(
            {"ip": "127.0.0.1", "port": ghost, "node_group": "from_kv", "source": "self"}
        ),
    )

    def group(name: str) -> dict[str, Any] | None:
        with ays.api() as api:
            answer = api.get(f"/node-groups/{name}")
        return answer.json() if answer.status_code == 200 else None

    made = wait_for(lambda: group("from_kv"), 15, "the group of the node listed in KV")
    assert made["auto_created"] is True
    assert made["description"] == f"created when node 127.0.0.1:{ghost} joined it"
    with ays.api() as api:
        added = api.post("/nodes", json={"ip": "127.0.0.1", "port": 19005, "node_group": "by_add"})
    assert added.status_code == 201, added.text
    assert added.json()["group_created"] is True
    assert (group("by_add") or {}).get("auto_created") is True
    assert (group("g1") or {}).get("auto_created") is False
    assert "registry: node group from_kv created" in ays.manager.log()


def test_manual_add_and_remove_through_the_api_and_the_cli_write_the_kv_node_list(
    make_cluster: Callable[..., Cluster], sqlite_url: str, kv: consul.Consul
) -> None:
    ays = make_cluster(sqlite_url)
    with ays.api() as api:
        added = api.post("/nodes", json={"ip": "127.0.0.1", "port": 19001, "node_group": "g1"})
        assert added.status_code == 201, added.text
        assert (
            api.post(
                "/nodes", json={"ip": "127.0.0.1", "port": 19001, "node_group": "g1"}
            ).status_code
            == 409
        )
    assert listed(kv) == [
        {"ip": "127.0.0.1", "port": 19001, "node_group": "g1", "source": "manual"}
    ]

    cli = [str(BIN / "aysManager"), "node"]
    done = subprocess.run(
        [
            *cli,
            "add",
            "-g",
            "g1",
            "--node-ip",
            "127.0.0.2",
            "--node-port",
            "19002",
            "--config",
            str(ays.config),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert {(e["ip"], e["port"]) for e in listed(kv)} == {
        ("127.0.0.1", 19001),
        ("127.0.0.2", 19002),
    }
    node_id = added.json()["id"]
    done = subprocess.run(
        [*cli, "remove", str(node_id), "--config", str(ays.config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert [(e["ip"], e["port"]) for e in listed(kv)] == [("127.0.0.2", 19002)]
    assert "127.0.0.1:19001" not in ays.nodes_by_address()

    ays.emu.stop()  # the node list cannot be written: nothing is
    try:
        with ays.api() as api:
            refused = api.post(
                "/nodes", json={"ip": "127.0.0.3", "port": 19003, "node_group": "g1"}
            )
    finally:
        ays.emu.start()
    assert refused.status_code == 503 and "node list" in refused.json()["error"]
    assert "127.0.0.3:19003" not in ays.nodes_by_address()


def test_the_watch_endpoint_needs_the_access_token_and_applies_then_rereads_the_node_list(
    make_cluster: Callable[..., Cluster], sqlite_url: str, emu: ConsulEmulator
) -> None:
    ays = make_cluster(sqlite_url, "a")
    entry = httpx.get(f"{emu.url}/v1/kv/{KEY}", headers={"X-Consul-Token": CONSUL_TOKEN}).json()[0]
    url = f"http://127.0.0.1:{ays.manager_port}{WATCH_PATH}"

    assert httpx.post(url, json=entry).status_code == 401
    assert httpx.post(url, json=entry, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert "refused POST /api/v1/registry/consul/watch" in ays.manager.log()

    # A pushed entry newer than Consul's own: applied at once, then the reread wins.
    pushed = [
        *json.loads(base64.b64decode(entry["Value"])),
        {"ip": "127.0.0.9", "port": 19009, "node_group": "g1", "source": "manual"},
    ]
    fake = entry | {
        "ModifyIndex": entry["ModifyIndex"] + 1_000,
        "Value": base64.b64encode(json.dumps(pushed).encode()).decode(),
    }
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    answered = httpx.post(url, json=fake, headers=bearer)
    assert answered.status_code == 200, answered.text
    wait_for(
        lambda: "node 127.0.0.9:19009 left the node list" in ays.manager.log(),
        10,
        "the reread from Consul",
    )
    assert "node 127.0.0.9:19009 (g1) joined the node list" in ays.manager.log()

    assert httpx.post(url, content=b"null", headers=bearer).status_code == 200  # key deleted
    wrong = httpx.post(url, json=entry | {"Key": "other/key"}, headers=bearer)
    assert wrong.status_code == 422 and KEY in wrong.json()["error"]
    assert ays.status("a") == "online"
    assert TOKEN not in ays.manager.log() and CONSUL_TOKEN not in ays.manager.log()


def test_a_cleanly_stopped_node_deregisters_and_leaves_the_list_only_when_configured(
    make_cluster: Callable[..., Cluster], sqlite_url: str, kv: consul.Consul, tmp_path: Path
) -> None:
    ays = make_cluster(sqlite_url, "stays")
    leaving = write_config(
        tmp_path / "leaving.yaml",
        sqlite_url,
        ays.manager_port,
        tmp_path / "leaving",
        ays.emu,
        leave_nodelist_on_stop=True,
    )
    ays.node("leaves", leaving).start(START_TIMEOUT)
    ays.wait_status("leaves", "online")

    for name in ("stays", "leaves"):
        assert ays.nodes[name].stop() == 0, ays.nodes[name].log()

    _, instances = kv.health.service("aysnode")
    assert instances == []
    assert [e["port"] for e in listed(kv)] == [ays.node_ports["stays"]]
    ays.wait_status("stays", "offline", timeout=5)
    ays.wait_status("leaves", "offline", timeout=5)


def test_a_manager_and_a_node_started_while_consul_is_down_join_when_it_comes_up(
    tmp_path: Path, sqlite_url: str, emu: ConsulEmulator
) -> None:
    emu.stop()
    port = free_port()
    config = write_config(tmp_path / "ays.yaml", sqlite_url, port, tmp_path, emu)
    boss = manager(config, tmp_path / "manager.log", port)
    worker = node(config, tmp_path / "node.log", "g1", free_port())
    try:
        boss.start(START_TIMEOUT)
        worker.start(START_TIMEOUT)
        with client(port) as api:
            assert api.post("/node-groups", json={"name": "g1"}).status_code == 201
        wait_for(lambda: "cannot join the registry" in worker.log(), 10, "the node's retry")
        time.sleep(2)
        emu.start()
        wait_for(lambda: _statuses(port) == ["online"], 30, "the node online")
    finally:
        worker.kill()
        boss.kill()
    assert_each_outage_logged_once(boss.log(), OUTAGE, BACK)
    assert worker.log().count("cannot join the registry") == 1


def _statuses(port: int) -> list[str]:
    with client(port) as api:
        return [n["status"] for n in api.get("/nodes").json()["items"]]


@pytest.mark.slow
def test_consul_down_for_30s_loses_no_fire_and_the_node_states_resynchronise_after(
    make_cluster: Callable[..., Cluster], sqlite_url: str
) -> None:
    ays = make_cluster(sqlite_url, "a", "b")
    task = add_task(ays, "true", schedule="* * * * * *", route_strategy="failover")
    wait_for(
        lambda: len([r for r in runs(ays, task) if r["status"] == "succeeded"]) >= 2,
        10,
        "fires before the outage",
    )

    ays.emu.stop()
    time.sleep(5)
    ays.nodes["b"].proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    time.sleep(25)
    ays.emu.start()

    ays.wait_status("b", "offline", timeout=10)
    assert ays.status("a") == "online"
    time.sleep(2)

    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            slots = list(
                conn.execute(
                    select(JobLog.scheduled_at)
                    .where(JobLog.task_id == task, JobLog.attempt == 0, JobLog.shard_index == 0)
                    .order_by(JobLog.scheduled_at)
                ).scalars()
            )
    finally:
        engine.dispose()
    assert len(slots) >= 33, f"{len(slots)} fires in ~35 s"
    gaps = [b - a for a, b in zip(slots, slots[1:], strict=False)]
    assert set(gaps) == {timedelta(seconds=1)}, "one fire per second, none lost, none twice"
    # Each watch retries on its own backoff (at most 5 s): the end is said when both are back.
    wait_for(lambda: BACK in ays.manager.log(), 15, "the end of the outage in the log")
    assert_each_outage_logged_once(ays.manager.log(), OUTAGE, BACK)


# -- installConfig ---------------------------------------------------------------------------

SECRETS = {
    "AYS_ACCESS_TOKEN": "tok-4f1c9e27-access",
    "AYS_CLUSTER_SECRET": "tok-4f1c9e27-access-cluster",
    "AYS_DB_PASSWORD": "pw-9a#b",
    "AYS_CONSUL_TOKEN": "consul-0d6e7a1b-acl",
    "AYS_ROCKETMQ_SECRET": "rmq-58c2-secret",
}


def test_installconfig_renders_the_consul_watch_for_a_consul_manager_and_masks_it(
    tmp_path: Path,
) -> None:
    stage = tmp_path / "stage"
    args = [
        "manager",
        "-e",
        "uat",
        "-p",
        "10.0.0.5",
        "-P",
        "18090",
        "--root",
        str(stage),
        "--skip-preflight",
    ]  # no RocketMQ proxy here

    dry = CliRunner(env=SECRETS).invoke(install_config_app, [*args, "--dry-run"])
    assert dry.exit_code == 0 and not stage.exists()
    done = CliRunner(env=SECRETS).invoke(install_config_app, args)

    path = stage / "etc/ays/consul-watch-ays.json"
    assert f"+++ {path} (rendered)" in dry.stdout
    assert done.exit_code == 0, done.output
    assert f"wrote {path}\n" in done.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert json.loads(path.read_text()) == {
        "watches": [
            {
                "type": "key",
                "key": "ays/uat/nodelist",
                "datacenter": "dc1",
                "token": SECRETS["AYS_CONSUL_TOKEN"],
                "handler_type": "http",
                "http_handler_config": {
                    "path": f"http://10.0.0.5:18090{WATCH_PATH}",
                    "method": "POST",
                    "header": {"Authorization": [f"Bearer {SECRETS['AYS_ACCESS_TOKEN']}"]},
                    "timeout": "10s",
                },
            }
        ]
    }
    assert "?token=" not in path.read_text()
    rotated = {name: f"{value}-2" for name, value in SECRETS.items()}
    again = CliRunner(env=rotated).invoke(install_config_app, [*args, "--dry-run"])
    assert '"header": {"Authorization": ["Bearer ********"]}' in again.stdout
    for value in [*SECRETS.values(), *rotated.values()]:
        assert value not in dry.stdout + again.stdout + done.stdout


def test_installconfig_writes_no_consul_watch_for_a_builtin_registry_or_a_node(
    tmp_path: Path,
) -> None:
    for args in (["manager", "-e", "dev"], ["node", "-e", "uat", "-g", "g1", "--skip-preflight"]):
        stage = tmp_path / args[0] / args[2]
        done = CliRunner(env=SECRETS).invoke(install_config_app, [*args, "--root", str(stage)])
        assert done.exit_code == 0, done.output
        assert not list(stage.rglob(consul_watch.WATCH_FILE))
    assert consul_watch.WATCH_PATH == WATCH_PATH
