"""The Consul emulator, driven only through py-consul (and httpx where headers matter)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import consul
import httpx
import pytest
import requests
from consul.exceptions import ACLPermissionDenied, BadRequest, NotFound

from tests.emulators.consul import ConsulEmulator

ClientFactory = Callable[..., consul.Consul]


@pytest.fixture
def emu() -> Iterator[ConsulEmulator]:
    with ConsulEmulator() as emulator:
        yield emulator


@pytest.fixture
def make_client() -> Iterator[Callable[..., consul.Consul]]:
    """py-consul clients whose connection pools are closed after the test."""
    clients: list[consul.Consul] = []

    def make(emulator: ConsulEmulator, token: str | None = None) -> consul.Consul:
        client = consul.Consul(host="127.0.0.1", port=emulator.port, token=token)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.http.session.close()


@pytest.fixture
def client(emu: ConsulEmulator, make_client: ClientFactory) -> consul.Consul:
    return make_client(emu)


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, step: float = 0.05) -> Any:
    """Poll until *predicate* returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(step)


class InBackground:
    """Run a call in a thread and keep its result, its exception and how long it took."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.elapsed = 0.0
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        start = time.monotonic()
        try:
            self.result = call()
        except BaseException as exc:  # reported by join()
            self.error = exc
        self.elapsed = time.monotonic() - start

    def join(self, timeout: float = 10.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


class _OkHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    """A tiny HTTP server on 127.0.0.1 answering 200 to every GET."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OkHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def service_checks(client: consul.Consul, name: str) -> list[dict[str, Any]]:
    _, entries = client.health.service(name)
    return [c for entry in entries for c in entry["Checks"] if c["ServiceID"]]


# --- KV -------------------------------------------------------------------------------------


def test_kv_put_then_get_returns_the_value_and_its_indexes(client: consul.Consul) -> None:
    assert client.kv.put("ays/config", "hello", flags=7) is True
    index, entry = client.kv.get("ays/config")
    assert entry["Value"] == b"hello"
    assert entry["Flags"] == 7
    assert entry["CreateIndex"] == entry["ModifyIndex"] == int(index)
    assert client.kv.get("ays/absent") == (index, None)


def test_cas_zero_creates_only_when_the_key_is_absent(client: consul.Consul) -> None:
    assert client.kv.put("ays/nodelist", "[]", cas=0) is True
    assert client.kv.put("ays/nodelist", "[1]", cas=0) is False
    assert client.kv.get("ays/nodelist")[1]["Value"] == b"[]"


def test_cas_with_an_index_writes_only_over_that_modify_index(client: consul.Consul) -> None:
    client.kv.put("ays/nodelist", "a")
    _, entry = client.kv.get("ays/nodelist")
    stale = entry["ModifyIndex"]
    assert client.kv.put("ays/nodelist", "b", cas=stale) is True
    assert client.kv.put("ays/nodelist", "c", cas=stale) is False
    assert client.kv.get("ays/nodelist")[1]["Value"] == b"b"


def test_two_writers_adding_themselves_with_a_cas_loop_both_end_up_in_the_list_once(
    emu: ConsulEmulator, make_client: ClientFactory
) -> None:
    key = "ays/nodelist"
    barrier = threading.Barrier(2)

    def join_list(me: str) -> int:
        client = make_client(emu)
        barrier.wait(5)
        for attempt in range(1, 51):
            _, entry = client.kv.get(key)
            if entry is None:
                if client.kv.put(key, json.dumps([me]), cas=0):
                    return attempt
                continue
            members = json.loads(entry["Value"])
            if me in members:
                return attempt
            if client.kv.put(key, json.dumps([*members, me]), cas=entry["ModifyIndex"]):
                return attempt
        raise AssertionError(f"{me} never got in")

    workers = [InBackground(lambda me=me: join_list(me)) for me in ("node-a", "node-b")]
    for worker in workers:
        worker.join()
    verify = make_client(emu)
    members = json.loads(verify.kv.get(key)[1]["Value"])
    assert sorted(members) == ["node-a", "node-b"]


def test_an_identical_put_does_not_bump_the_modify_index(client: consul.Consul) -> None:
    client.kv.put("ays/k", "same", flags=1)
    first = client.kv.get("ays/k")[1]["ModifyIndex"]
    assert client.kv.put("ays/k", "same", flags=1) is True
    assert client.kv.get("ays/k")[1]["ModifyIndex"] == first
    client.kv.put("ays/k", "same", flags=2)
    assert client.kv.get("ays/k")[1]["ModifyIndex"] > first


def test_a_blocking_get_returns_as_soon_as_the_key_changes(client: consul.Consul) -> None:
    client.kv.put("ays/watched", "v1")
    index, _ = client.kv.get("ays/watched")
    waiter = InBackground(lambda: client.kv.get("ays/watched", index=index, wait="30s"))
    time.sleep(0.2)
    writer = consul.Consul(host="127.0.0.1", port=client.http.port)
    try:
        writer.kv.put("ays/watched", "v2")
    finally:
        writer.http.session.close()
    new_index, entry = waiter.join()
    assert int(new_index) > int(index)
    assert entry["Value"] == b"v2"
    assert waiter.elapsed < 15  # woken by the write, not by the 30 s wait running out


def test_a_blocking_get_times_out_with_the_same_index_when_nothing_changes(
    client: consul.Consul,
) -> None:
    client.kv.put("ays/quiet", "v1")
    index, _ = client.kv.get("ays/quiet")
    start = time.monotonic()
    assert client.kv.get("ays/quiet", index=index, wait="1s")[0] == index
    assert 0.95 <= time.monotonic() - start < 10  # the wait asked, not the default 5 min


def test_a_write_to_another_key_does_not_wake_a_blocking_get(
    emu: ConsulEmulator, make_client: ClientFactory
) -> None:
    watcher, writer = make_client(emu), make_client(emu)
    watcher.kv.put("ays/watched", "v1")
    index, _ = watcher.kv.get("ays/watched")
    waiter = InBackground(lambda: watcher.kv.get("ays/watched", index=index, wait="1s"))
    time.sleep(0.2)
    writer.kv.put("ays/other", "x")
    assert waiter.join()[0] == index
    assert waiter.elapsed >= 0.95


def test_a_missing_key_answers_404_with_an_index_header(emu: ConsulEmulator) -> None:
    with httpx.Client(base_url=emu.url) as http:
        response = http.get("/v1/kv/ays/missing")
    assert response.status_code == 404
    assert int(response.headers["X-Consul-Index"]) >= 1
    assert response.headers["X-Consul-KnownLeader"] == "true"


def test_agent_endpoints_send_no_index_header(emu: ConsulEmulator) -> None:
    with httpx.Client(base_url=emu.url) as http:
        response = http.get("/v1/agent/services")
    assert response.status_code == 200
    assert "X-Consul-Index" not in response.headers


def test_a_key_name_with_a_colon_is_rejected_with_consuls_message(client: consul.Consul) -> None:
    with pytest.raises(BadRequest, match="invalid character ':'"):
        client.kv.put("ays/nodes/10.0.0.1:8080", "x")


# --- services, checks and health --------------------------------------------------------------


def test_an_http_check_passes_against_a_live_server_and_goes_critical_when_it_stops(
    client: consul.Consul, health_server: ThreadingHTTPServer
) -> None:
    port = health_server.server_address[1]
    check = consul.Check.http(f"http://127.0.0.1:{port}/health", interval="1s", timeout="1s")
    client.agent.service.register(
        "executor", service_id="executor-1", address="127.0.0.1", port=port, check=check
    )
    assert service_checks(client, "executor")[0]["Status"] == "critical"  # before the first run

    wait_for(lambda: client.health.service("executor", passing=True)[1], timeout=10)
    [passing] = service_checks(client, "executor")
    assert passing["CheckID"] == "service:executor-1"
    assert passing["Output"].startswith(f"HTTP GET http://127.0.0.1:{port}/health: 200 OK")

    health_server.shutdown()
    health_server.server_close()
    wait_for(lambda: service_checks(client, "executor")[0]["Status"] == "critical", timeout=5)
    assert client.health.service("executor", passing=True)[1] == []


def test_a_tcp_check_passes_when_the_port_accepts(
    client: consul.Consul, health_server: ThreadingHTTPServer
) -> None:
    port = health_server.server_address[1]
    client.agent.service.register(
        "tcpsvc", port=port, check=consul.Check.tcp("127.0.0.1", port, "1s")
    )
    wait_for(lambda: client.health.service("tcpsvc", passing=True)[1], timeout=5)
    assert service_checks(client, "tcpsvc")[0]["Output"] == f"TCP connect 127.0.0.1:{port}: Success"


def test_health_service_passing_filters_out_instances_with_a_failing_check(
    client: consul.Consul,
) -> None:
    for sid in ("n1", "n2"):
        client.agent.service.register(
            "nodes", service_id=sid, tags=["g1"], check=consul.Check.ttl("30s")
        )
    client.agent.check.ttl_pass("service:n1")
    _, everyone = client.health.service("nodes")
    _, passing = client.health.service("nodes", passing=True)
    assert sorted(e["Service"]["ID"] for e in everyone) == ["n1", "n2"]
    assert [e["Service"]["ID"] for e in passing] == ["n1"]
    assert [c["CheckID"] for c in passing[0]["Checks"]] == ["serfHealth", "service:n1"]
    assert client.health.service("nodes", tag="other")[1] == []


def test_a_repeated_ttl_pass_does_not_bump_the_health_index_but_a_status_change_does(
    client: consul.Consul,
) -> None:
    client.agent.service.register("ttlsvc", service_id="t1", check=consul.Check.ttl("30s"))
    registered, _ = client.health.service("ttlsvc")

    client.agent.check.ttl_pass("service:t1")
    passed, _ = client.health.service("ttlsvc")
    assert int(passed) > int(registered)

    client.agent.check.ttl_pass("service:t1")
    client.agent.check.ttl_pass("service:t1", notes="still fine")  # output only: deferred
    assert client.health.service("ttlsvc")[0] == passed
    assert client.agent.checks()["service:t1"]["Output"] == "still fine"
    assert service_checks(client, "ttlsvc")[0]["Output"] == ""
    start = time.monotonic()
    assert client.health.service("ttlsvc", index=passed, wait="1s")[0] == passed
    assert time.monotonic() - start >= 0.95

    client.agent.check.ttl_warn("service:t1")
    assert int(client.health.service("ttlsvc")[0]) > int(passed)


def test_a_ttl_check_goes_critical_when_it_is_not_renewed(
    client: consul.Consul, emu: ConsulEmulator
) -> None:
    client.agent.service.register(
        "expiring", service_id="e1", check={"TTL": "1s", "Status": "passing"}
    )
    assert service_checks(client, "expiring")[0]["Status"] == "passing"
    wait_for(lambda: service_checks(client, "expiring")[0]["Status"] == "critical", timeout=4)
    assert service_checks(client, "expiring")[0]["Output"] == "TTL expired"


def test_a_service_critical_longer_than_deregister_critical_service_after_is_reaped(
    make_client: ClientFactory,
) -> None:
    with ConsulEmulator(check_reap_interval=0.1) as emulator:
        client = make_client(emulator)
        check = {"TTL": "30s", "DeregisterCriticalServiceAfter": "1s"}
        client.agent.service.register("doomed", service_id="d1", check=check)
        assert "d1" in client.agent.services()
        wait_for(lambda: "d1" not in client.agent.services(), timeout=4)
        assert client.health.service("doomed")[1] == []
        assert "doomed" not in client.catalog.services()[1]


def test_deregistering_a_service_removes_it_from_health_and_catalog(
    client: consul.Consul,
) -> None:
    client.agent.service.register("gone", service_id="g1", check=consul.Check.ttl("30s"))
    before, _ = client.health.service("gone")
    client.agent.service.deregister("g1")
    after, entries = client.health.service("gone")
    assert entries == [] and int(after) > int(before)
    assert client.agent.service.deregister("g1") is False  # 404 "Unknown service ID"


# --- sessions and locks -----------------------------------------------------------------------


def test_a_held_lock_cannot_be_acquired_by_another_session_until_released(
    client: consul.Consul,
) -> None:
    first = client.session.create(name="first", lock_delay=0)
    second = client.session.create(name="second", lock_delay=0)
    assert client.kv.put("ays/leader", "first", acquire=first) is True
    assert client.kv.put("ays/leader", "second", acquire=second) is False
    _, entry = client.kv.get("ays/leader")
    assert entry["Session"] == first and entry["LockIndex"] == 1

    assert client.kv.put("ays/leader", "", release=second) is False
    assert client.kv.put("ays/leader", "first", release=first) is True
    assert "Session" not in client.kv.get("ays/leader")[1]
    assert client.kv.put("ays/leader", "second", acquire=second) is True
    assert client.kv.get("ays/leader")[1]["LockIndex"] == 2


def test_destroying_a_session_releases_its_locks_after_the_lock_delay(
    client: consul.Consul,
) -> None:
    holder = client.session.create(lock_delay=1)
    other = client.session.create(lock_delay=0)
    assert client.kv.put("ays/leader", "holder", acquire=holder) is True
    assert client.session.destroy(holder) is True

    _, entry = client.kv.get("ays/leader")
    assert "Session" not in entry and entry["Value"] == b"holder"
    assert client.kv.put("ays/leader", "other", acquire=other) is False  # lock-delay
    wait_for(lambda: client.kv.put("ays/leader", "other", acquire=other), timeout=3, step=0.1)
    with pytest.raises(NotFound):
        client.session.renew(holder)
    assert client.session.info(holder)[1] is None


def test_a_delete_behaviour_session_deletes_its_keys_when_destroyed(
    client: consul.Consul,
) -> None:
    session = client.session.create(behavior="delete", lock_delay=0)
    client.kv.put("ays/ephemeral", "x", acquire=session)
    client.session.destroy(session)
    assert client.kv.get("ays/ephemeral")[1] is None


def test_a_session_is_invalidated_when_its_check_goes_critical(client: consul.Consul) -> None:
    client.agent.service.register(
        "locker", service_id="l1", check={"TTL": "30s", "Status": "passing"}
    )
    session = client.session.create(checks=["serfHealth", "service:l1"], lock_delay=0)
    client.kv.put("ays/guarded", "x", acquire=session)
    client.agent.check.ttl_fail("service:l1")
    assert client.session.info(session)[1] is None
    assert "Session" not in client.kv.get("ays/guarded")[1]


# --- ACL, outages -------------------------------------------------------------------------------


def test_an_acl_token_is_required_when_configured(make_client: ClientFactory) -> None:
    with ConsulEmulator(token="s3cret") as emulator:
        with pytest.raises(ACLPermissionDenied, match="Permission denied"):
            make_client(emulator).kv.get("ays/x")
        with pytest.raises(ACLPermissionDenied, match="ACL not found"):
            make_client(emulator, token="wrong").kv.put("ays/x", "1")
        good = make_client(emulator, token="s3cret")
        assert good.kv.put("ays/x", "1") is True
        assert good.kv.get("ays/x")[1]["Value"] == b"1"
        assert make_client(emulator).status.leader() == "127.0.0.1:8300"


def test_stop_is_prompt_while_a_blocking_query_waits_and_start_resumes_with_the_data(
    emu: ConsulEmulator, make_client: ClientFactory
) -> None:
    client = make_client(emu)
    client.kv.put("ays/durable", "v1")
    index, _ = client.kv.get("ays/durable")
    port = emu.port
    blocked = InBackground(lambda: client.kv.get("ays/durable", index=index, wait="30s"))
    time.sleep(0.2)

    start = time.monotonic()
    emu.stop()
    assert time.monotonic() - start < 10  # not held by the 30 s blocking query
    try:
        blocked.join(5)
    except requests.exceptions.ConnectionError:
        pass  # the connection was dropped: as good as an answer for an outage
    with pytest.raises(requests.exceptions.ConnectionError):
        make_client(emu).kv.get("ays/durable")

    emu.start()
    assert emu.port == port
    assert make_client(emu).kv.get("ays/durable") == (index, client.kv.get("ays/durable")[1])
