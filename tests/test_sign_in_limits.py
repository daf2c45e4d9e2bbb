"""Limits on guessing console passwords (ays_runtime/users/lockout.py): failed sign-ins are
counted per user name and per source address in the database, so every manager of the env
counts them together; past a limit the name (or the address) is refused with 429 and
Retry-After, its password unchecked, until the lock-out ends or an admin ends it; a success
clears the name's count; the audit trail and the metrics record it, never the password.

Real managers (aysManager debug) over real HTTP, on SQLite and on MariaDB.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.daemons import TOKEN, Daemon, client, free_port, manager, wait_for, write_config
from tests.test_cli import cli

PASSWORD = "the right password"
WRONG = "a wrong guess %d"
LOCKOUT = 4.0  # seconds: short, so that the test waits for its end
LIMITS = {
    "max_failures_per_account": 5,
    "max_failures_per_address": 10,
    "window": 120,
    "lockout": LOCKOUT,
}


class Managers:
    """Managers of one env on one database; sign-ins through any of them."""

    def __init__(self, tmp: Path, url: str) -> None:
        self.tmp, self.url = tmp, url
        self.ports: list[int] = []
        self.daemons: list[Daemon] = []
        self.configs: list[Path] = []

    def start(self, count: int) -> Managers:
        for i in range(count):
            port = free_port()
            config = write_config(
                self.tmp / f"m{i}.yaml",
                self.url,
                port,
                self.tmp / f"m{i}",
                console={"sign_in": LIMITS},
            )
            self.daemons.append(manager(config, self.tmp / f"m{i}.log", port).start())
            self.ports.append(port)
            self.configs.append(config)
        return self

    def add_user(self, name: str) -> None:
        with client(self.ports[0]) as api:
            made = api.post("/users", json={"name": name, "role": "viewer", "password": PASSWORD})
            assert made.status_code == 201, made.text

    def sign_in(self, name: str, password: str, via: int = 0) -> httpx.Response:
        url = f"http://127.0.0.1:{self.ports[via]}/login"
        return httpx.post(url, data={"username": name, "password": password}, timeout=30)

    def fail(self, name: str, times: int, via: int = 0) -> None:
        for i in range(times):
            answer = self.sign_in(name, WRONG % i, via=i % len(self.ports) if via < 0 else via)
            assert answer.status_code == 401, answer.text
            assert "do not match" in answer.text

    def audit(self, action: str) -> list[dict[str, object]]:
        with client(self.ports[0]) as api:
            items: list[dict[str, object]] = api.get(
                "/audit", params={"action": action, "limit": 1000}
            ).json()["items"]
            return items

    def logs(self) -> str:
        return "\n".join(d.log() for d in self.daemons)

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.kill()


@pytest.fixture
def ays(tmp_path: Path, database_url: str) -> Iterator[Managers]:
    managers = Managers(tmp_path, database_url)
    try:
        yield managers
    finally:
        managers.stop()


def refused(answer: httpx.Response, whose: str) -> bool:
    return (
        answer.status_code == 429
        and f"Too many failed sign-ins {whose}; try again in" in answer.text
        and 1 <= int(answer.headers["retry-after"]) <= LOCKOUT
    )


def test_five_wrong_passwords_lock_the_name_on_every_manager_until_the_lock_out_ends(
    ays: Managers,
) -> None:
    ays.start(2).add_user("alice")
    ays.fail("alice", 5, via=-1)  # alternately through both managers: one count

    for via in (0, 1):
        right = ays.sign_in("alice", PASSWORD, via=via)
        assert refused(right, "for this account"), (right.status_code, right.text[-600:])
        assert re.search(r"try again in \d seconds?\.", right.text)
        assert "set-cookie" not in right.headers

    # Refusals are not counted and do not extend it: the right password works once it ends.
    signed_in = wait_for(
        lambda: ays.sign_in("alice", PASSWORD).status_code == 303,
        LOCKOUT + 30,
        "the lock-out to end",
        interval=0.25,
    )
    assert signed_in

    failures = ays.audit("sign_in.failed")
    assert len(failures) == 5 and {f["target"] for f in failures} == {"alice"}
    assert {f["via"] for f in failures} == {"console"}
    assert {f["source"] for f in failures} == {"127.0.0.1"}
    locked = ays.audit("sign_in.locked_out")
    assert [(e["target"], e["after"]["kind"]) for e in locked] == [("alice", "account")]  # type: ignore[index]

    metrics = "".join(
        httpx.get(
            f"http://127.0.0.1:{port}/metrics",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        ).text
        for port in ays.ports
    )
    assert 'ays_sign_ins_total{outcome="refused"}' in metrics
    assert 'ays_sign_ins_total{outcome="failed"} 3.0' in metrics  # 3 + 2 over the two
    assert "locked out until" in ays.logs()

    secrets = [PASSWORD] + [WRONG % i for i in range(5)]
    with client(ays.ports[0]) as api:
        trail = api.get("/audit", params={"limit": 1000}).text
    for secret in secrets:
        assert secret not in ays.logs() and secret not in trail


def test_a_success_clears_the_names_count(ays: Managers) -> None:
    ays.start(1).add_user("bob")
    ays.fail("bob", 4)
    assert ays.sign_in("bob", PASSWORD).status_code == 303
    ays.fail("bob", 4)  # four again, not eight: still not locked out
    assert ays.sign_in("bob", PASSWORD).status_code == 303


def test_one_names_failures_lock_another_name_only_at_the_address_limit(ays: Managers) -> None:
    ays.start(1)
    for name in ("ann", "ben", "cid"):
        ays.add_user(name)
    ays.fail("ann", 5)  # ann is locked out; the address has 5 of its 10
    assert refused(ays.sign_in("ann", PASSWORD), "for this account")
    ays.fail("ben", 4)  # 9 from the address
    assert ays.sign_in("ben", PASSWORD).status_code == 303  # a success is not counted
    ays.fail("cid", 1)  # the tenth: the address is locked out, for every name
    assert refused(ays.sign_in("cid", PASSWORD), "from this address")
    assert refused(ays.sign_in("ben", PASSWORD), "from this address")
    locked = ays.audit("sign_in.locked_out")
    assert sorted(e["after"]["kind"] for e in locked) == ["account", "address"]  # type: ignore[index]


def test_an_admin_ends_a_lock_out_with_user_unlock(ays: Managers) -> None:
    ays.start(1).add_user("dora")
    ays.fail("dora", 5)
    assert refused(ays.sign_in("dora", PASSWORD), "for this account")

    # Who is locked out shows in the user list (API and CLI) until the lock-out ends.
    with client(ays.ports[0]) as api:
        listed = {u["name"]: u for u in api.get("/users").json()["items"]}
        assert listed["dora"]["locked_until"] is not None
        assert api.get("/users/dora").json()["locked_until"] == listed["dora"]["locked_until"]
    table = cli("user", "list", "--config", str(ays.configs[0]))
    assert table.returncode == 0, table.stderr
    assert "LOCKED OUT UNTIL" in table.stdout
    dora = next(line for line in table.stdout.splitlines() if line.startswith("dora "))
    assert len(re.findall(r"\d\d:\d\d", dora)) == 2, dora  # locked out until, changed

    done = cli("user", "unlock", "dora", "--config", str(ays.configs[0]))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("unlocked dora (locked out until ")
    assert ays.sign_in("dora", PASSWORD).status_code == 303
    again = cli("user", "unlock", "dora", "--config", str(ays.configs[0]))
    assert again.stdout.strip() == "dora was not locked out"
    with client(ays.ports[0]) as api:
        assert api.get("/users/dora").json()["locked_until"] is None
    nobody = cli("user", "unlock", "nobody", "--config", str(ays.configs[0]))
    assert nobody.returncode == 3 and "nobody" in nobody.stderr

    unlocked = ays.audit("sign_in.unlocked")
    assert [e["target"] for e in unlocked] == ["dora"]
    assert str(unlocked[0]["who"]).endswith("(token)")  # the CLI's caller, by the env token
