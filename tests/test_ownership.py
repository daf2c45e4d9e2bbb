"""Partitioned ownership (scheduler/ownership.py): real manager processes on one MariaDB.

Three managers divide the every-second tasks; each enabled task is held by exactly one live
manager; a manager killed (-9) or stopped cleanly hands its tasks to the others, a manager
coming back takes its share back, and through all of it every slot of every task is fired
exactly once (no double, none lost). Each slot costs one job-log insert with one, two or
three managers (the managers' `ays_fires_submitted_total` against the slots claimed).
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select, update

from ays_runtime.manager.liveness import adopt_from_silent, record_alive
from ays_runtime.scheduler.firing import Fire, claim_slots
from ays_runtime.scheduler.ownership import BUCKETS, buckets_of, mark_stopped, owner_of
from ays_runtime.scheduler.reconcile import Reconciler, memory_snapshot
from ays_runtime.scheduler.timers import TimerList
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import JobLog, Manager, RunStatus, TimerRow, TriggerKind
from tests.daemons import TOKEN, Daemon, client, free_port, manager, wait_for, write_config

TASKS = 12
# Short beats so the test runs in seconds; the bound scales with them (README). A grace
# shorter than a silent manager's gap, so its slots are caught up by the gainer's look-back.
OWNERSHIP = {"beat_interval": 1, "silent_after": 3, "misfire_grace": 2}


class Managers:
    def __init__(self, tmp: Path, url: str, count: int) -> None:
        self.tmp, self.url = tmp, url
        self.ports = [free_port() for _ in range(count)]
        self.daemons: list[Daemon | None] = [None] * count
        self.engine = create_engine(url)

    def id(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def start(self, i: int) -> None:
        port = self.ports[i]
        config = write_config(
            self.tmp / f"m{i}.yaml", self.url, port, self.tmp / f"m{i}", manager=OWNERSHIP
        )
        self.daemons[i] = manager(config, self.tmp / f"m{i}.log", port).start()

    def up(self) -> list[int]:
        return [i for i, d in enumerate(self.daemons) if d is not None]

    def stop(self, i: int, sig: int = signal.SIGINT) -> None:
        daemon = self.daemons[i]
        assert daemon is not None
        if sig == signal.SIGKILL:
            daemon.kill()
        else:
            assert daemon.stop(sig) == 0, daemon.log()
        self.daemons[i] = None

    def logs(self) -> str:
        return "\n".join(
            (self.tmp / f"m{i}.log").read_text(errors="replace")[-3000:]
            for i in range(len(self.ports))
            if (self.tmp / f"m{i}.log").exists()
        )

    def held(self) -> dict[int, list[str]]:
        """{task_id: [manager ids holding its timer]}, over the live managers."""
        live = {self.id(i) for i in self.up()}
        with self.engine.connect() as conn:
            rows = conn.execute(select(TimerRow.task_id, TimerRow.manager_id)).all()
        out: dict[int, list[str]] = {}
        for task_id, manager_id in rows:
            if manager_id in live:
                out.setdefault(task_id, []).append(manager_id)
        return out

    def settled(self, tasks: list[int]) -> bool:
        """Every task held by exactly the live manager its rendezvous owner says."""
        live = sorted(self.id(i) for i in self.up())
        held = self.held()
        return all(held.get(t) == [owner_of(t, live)] for t in tasks)

    def slots(self, tasks: list[int]) -> list[tuple[int, datetime]]:
        with self.engine.connect() as conn:
            return [
                (r.task_id, r.scheduled_at)
                for r in conn.execute(
                    select(JobLog.task_id, JobLog.scheduled_at).where(
                        JobLog.task_id.in_(tasks),
                        JobLog.attempt == 0,
                        JobLog.trigger.in_((TriggerKind.CRON.value, TriggerKind.MISFIRE.value)),
                    )
                )
            ]

    def claimed_ahead_by(self, manager_id: str) -> int:
        """Runs `manager_id` claimed ahead of their slots and has not sent."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.count())
                .select_from(JobLog)
                .where(
                    JobLog.manager_id == manager_id,
                    JobLog.status == RunStatus.PENDING.value,
                    JobLog.attempt == 0,
                    JobLog.due_at.is_not(None),
                )
            ).scalar_one()

    def counters(self) -> tuple[float, float]:
        """(fires submitted, scheduled fires claimed), summed over the running managers."""
        submitted = claimed = 0.0
        for i in self.up():
            text = httpx.get(
                f"http://127.0.0.1:{self.ports[i]}/metrics",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=10,
            ).text
            submitted += _metric(text, r"^ays_fires_submitted_total (\S+)$")
            for trigger in ("cron", "misfire"):
                claimed += _metric(
                    text, rf'^ays_fires_claimed_total\{{trigger="{trigger}"\}} (\S+)$'
                )
        return submitted, claimed

    def close(self) -> None:
        for daemon in self.daemons:
            if daemon is not None:
                daemon.kill()
        self.engine.dispose()


def _metric(text: str, pattern: str) -> float:
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def three(tmp_path: Path, mysql_url: str) -> Iterator[tuple[Managers, list[int]]]:
    ays = Managers(tmp_path, mysql_url, 3)
    try:
        for i in range(3):
            ays.start(i)
        tasks = []
        with client(ays.ports[0]) as api:
            assert api.post("/node-groups", json={"name": "g1"}).status_code == 201
            for n in range(TASKS):
                response = api.post(
                    "/tasks",
                    json={
                        "name": f"tick-{n}",
                        "node_group": "g1",
                        "schedule": "* * * * * *",
                        "task_type": "shell",
                        "payload": {"command": "true"},
                    },
                )
                assert response.status_code == 201, response.text
                tasks.append(int(response.json()["id"]))
        wait_for(lambda: ays.settled(tasks), 60, "each task held by its one owner")
        yield ays, tasks
    finally:
        ays.close()


def assert_every_slot_once(ays: Managers, tasks: list[int], start: datetime, end: datetime) -> None:
    """Every second in [start, end] of every task fired exactly once."""
    per_slot = Counter((t, at) for t, at in ays.slots(tasks) if start <= at <= end)
    doubles = [key for key, n in per_slot.items() if n > 1]
    seconds = int((end - start).total_seconds()) + 1
    lost = [
        (t, start + timedelta(seconds=s))
        for t in tasks
        for s in range(seconds)
        if (t, start + timedelta(seconds=s)) not in per_slot
    ]
    assert not doubles, doubles
    assert not lost, (lost[:20], ays.logs())


def whole_second(at: datetime) -> datetime:
    return at.replace(microsecond=0)


def inserts_per_slot(ays: Managers) -> float:
    """Fires submitted over slots claimed across the running managers over a few seconds,
    read half a second off the slot times (no claim in flight then)."""

    def read() -> tuple[float, float]:
        time.sleep(1.5 - (time.time() % 1.0))  # at x.5 s: the x.0 fires are claimed
        return ays.counters()

    submitted0, claimed0 = read()
    time.sleep(5)
    submitted1, claimed1 = read()
    claimed = claimed1 - claimed0
    assert claimed >= TASKS * 3, (claimed, ays.logs())
    return (submitted1 - submitted0) / claimed


def test_each_task_has_one_owner_each_slot_one_insert_and_clean_stops_miss_no_slot(
    three: tuple[Managers, list[int]],
) -> None:
    ays, tasks = three
    live = sorted(ays.id(i) for i in range(3))
    shares = [buckets_of(m, live) for m in live]
    assert sum(len(s) for s in shares) == BUCKETS and not (shares[0] & shares[1] & shares[2])
    with client(ays.ports[1]) as api:
        listed = api.get("/managers").json()
    assert listed["live"] == 3 and listed["answered_by"] == ays.id(1)
    assert sum(m["tasks_owned"] for m in listed["managers"] if m["alive"]) == TASKS
    start = whole_second(utcnow()) + timedelta(seconds=1)

    figures = {3: inserts_per_slot(ays)}
    ays.stop(2)  # clean stop: its row says stopped, the others take its share
    wait_for(lambda: ays.settled(tasks), 30, "the stopped manager's tasks taken over")
    figures[2] = inserts_per_slot(ays)
    ays.stop(1)
    wait_for(lambda: ays.settled(tasks), 30, "the second stopped manager's tasks taken over")
    figures[1] = inserts_per_slot(ays)
    end = whole_second(utcnow()) - timedelta(seconds=2)
    print("inserts per slot by managers running:", figures)
    assert all(abs(ratio - 1.0) <= 0.1 for ratio in figures.values()), figures
    with client(ays.ports[0]) as api:
        listed = api.get("/managers").json()
    assert listed["live"] == 1
    stopped = [m for m in listed["managers"] if m["stopped_at"] is not None]
    assert sorted(m["manager_id"] for m in stopped) == sorted([ays.id(1), ays.id(2)])
    assert_every_slot_once(ays, tasks, start, end)


def test_a_killed_manager_s_tasks_move_to_the_others_and_back_when_it_returns(
    three: tuple[Managers, list[int]],
) -> None:
    ays, tasks = three
    start = whole_second(utcnow()) + timedelta(seconds=1)
    time.sleep(2)
    held = Counter(ays.held()[t][0] for t in tasks)
    index = max(range(3), key=lambda i: held[ays.id(i)])  # the one with the most tasks
    victim = ays.id(index)
    theirs = [t for t in tasks if ays.held()[t] == [victim]]
    killed_at = time.monotonic()
    ays.stop(index, signal.SIGKILL)
    print(f"runs the killed manager held, claimed ahead: {ays.claimed_ahead_by(victim)}")
    wait_for(lambda: ays.settled(tasks), 45, "the killed manager's tasks taken over")
    # Those slots count as fired: their runs are adopted with the tasks, not a minute later
    # (manager.adopt_after, 60 s, for the rest of its pending runs).
    wait_for(
        lambda: ays.claimed_ahead_by(victim) == 0,
        40,
        "the killed manager's runs claimed ahead adopted",
    )
    print(
        f"killed manager's {len(theirs)} task(s) held by the others after "
        f"{time.monotonic() - killed_at:.1f} s (bound: silent_after + beat_interval + reconcile)"
    )
    time.sleep(3)
    ays.start(index)  # the same id comes back and takes its share back
    wait_for(lambda: ays.settled(tasks), 45, "the returning manager's share back")
    back_at = utcnow()
    time.sleep(4)
    end = whole_second(utcnow()) - timedelta(seconds=2)
    for i in ays.up():
        ays.stop(i)
    assert_every_slot_once(ays, tasks, start, end)
    with ays.engine.connect() as conn:
        fired_by_returned = conn.execute(
            select(JobLog.id).where(JobLog.manager_id == victim, JobLog.scheduled_at >= back_at)
        ).first()
    assert theirs and fired_by_returned is not None, ays.logs()


# --- the parts, in one process ------------------------------------------------------------


def test_rendezvous_shares_cover_every_bucket_once_and_a_join_moves_only_the_joiners_share() -> (
    None
):
    two = ["10.0.0.1:18080", "10.0.0.2:18080"]
    three = [*two, "10.0.0.3:18080"]
    before = {m: buckets_of(m, two) for m in two}
    after = {m: buckets_of(m, three) for m in three}
    assert sum(len(s) for s in after.values()) == BUCKETS
    assert set().union(*after.values()) == set(range(BUCKETS))
    for m in two:  # each old manager only gives buckets away, to the new one
        assert after[m] <= before[m]
    assert all(200 < len(s) < 480 for s in after.values()), [len(s) for s in after.values()]
    assert buckets_of("10.0.0.1:18080", ["10.0.0.1:18080"]) == set(range(BUCKETS))


def _every_second_task_fired(engine: Any, at: datetime) -> int:
    from tests.test_scheduler import add_task

    task = add_task(
        engine, "tick", "* * * * * *", misfire_policy="skip", updated_at=at - timedelta(hours=1)
    )
    claim_slots(engine, "127.0.0.1:1", [Fire(task, at)], at)  # the last fire, by a peer
    return task


def test_a_task_gained_in_a_handover_fires_every_slot_since_its_last_fire(engine: Any) -> None:
    now = datetime(2026, 5, 1, 12, 0, 10, 300000)
    task = _every_second_task_fired(engine, datetime(2026, 5, 1, 12, 0, 1))
    rec = Reconciler(engine, "127.0.0.1:2", misfire_grace=5)
    plan = rec.plan({}, now, None, timedelta(seconds=13))
    # 12:00:02 .. 12:00:10 are due: fired by the plan now; 12:00:11 on is the timer's.
    assert [m.scheduled_at.second for m in plan.catch_up] == list(range(2, 11))
    assert [t.fire_at.second for t in plan.put_timers] == [11]
    assert not plan.missed
    # A manager that never saw a peer keeps the single-manager rules: skip, and the ledger.
    alone = rec.plan({}, now)
    assert not alone.catch_up and [r.task_id for r in alone.missed] == [task]


def test_a_manager_installs_only_its_share_and_drops_what_moved_away(engine: Any) -> None:
    from tests.test_scheduler import add_task

    ids = [add_task(engine, f"t{i}", "0 0 * * * *") for i in range(6)]
    rec = Reconciler(engine, "127.0.0.1:2", misfire_grace=5)
    timers = TimerList()
    plan = rec.plan({}, utcnow())
    rec.apply(plan)
    Reconciler.apply_to_memory(plan, timers)
    assert {t.task_id for t in timers} == set(ids)
    mine = frozenset(i % BUCKETS for i in ids[:3])
    plan = rec.plan(memory_snapshot(timers), utcnow(), mine)
    rec.apply(plan)
    Reconciler.apply_to_memory(plan, timers)
    assert {t.task_id for t in timers} == set(ids[:3])
    assert {a.task_id for a in plan.actions if "another live manager" in a.detail} == set(ids[3:])
    again = rec.plan(memory_snapshot(timers), utcnow(), mine)
    assert not again and not again.full_read  # the cheap tick, restricted to the share


def test_a_stopped_manager_s_pending_runs_are_adopted_at_once_by_the_owner_of_each_task(
    engine: Any,
) -> None:
    from tests.test_scheduler import add_task

    peer = "127.0.0.1:1"
    first, second = add_task(engine, "a"), add_task(engine, "b")
    record_alive(engine, peer, "test", utcnow())
    at = whole_second(utcnow())
    claim_slots(engine, peer, [Fire(first, at), Fire(second, at)], at)
    long = timedelta(minutes=1)
    assert adopt_from_silent(engine, "127.0.0.1:2", long) is None  # alive: left alone
    mark_stopped(engine, peer)
    token = adopt_from_silent(engine, "127.0.0.1:2", long, {first % BUCKETS}, BUCKETS)
    assert token is not None
    with engine.connect() as conn:
        owners = dict(conn.execute(select(JobLog.task_id, JobLog.manager_id)).all())
    assert owners == {first: "127.0.0.1:2", second: peer}  # only the task it owns
    assert adopt_from_silent(engine, "127.0.0.1:3", long, {second % BUCKETS}, BUCKETS)
    record_alive(engine, peer, "test", utcnow())  # started again: not stopped any more
    with engine.connect() as conn:
        row = conn.execute(select(Manager.stopped_at).where(Manager.manager_id == peer)).one()
    assert row.stopped_at is None


def test_a_silent_manager_s_runs_claimed_ahead_are_adopted_when_its_tasks_move(
    engine: Any,
) -> None:
    from tests.test_scheduler import add_task

    peer, me = "127.0.0.1:1", "127.0.0.1:2"
    ahead, at_slot, retry = add_task(engine, "a"), add_task(engine, "b"), add_task(engine, "c")
    record_alive(engine, peer, "test", utcnow())
    now = whole_second(utcnow())
    slot = now + timedelta(seconds=1)
    claim_slots(
        engine,
        peer,
        [
            Fire(ahead, slot, due_at=slot),  # claimed ahead, held by the peer
            Fire(at_slot, now),  # claimed at its slot, not sent yet
            Fire(retry, now, attempt=1, due_at=slot),  # a retry waiting its backoff
        ],
        now,
    )
    short, long = timedelta(seconds=5), timedelta(minutes=1)
    assert adopt_from_silent(engine, me, short, claimed_ahead=True) is None  # alive
    with engine.begin() as conn:  # silent for 10 s: its tasks have moved
        conn.execute(
            update(Manager)
            .where(Manager.manager_id == peer)
            .values(last_seen=utcnow() - timedelta(seconds=10))
        )
    assert adopt_from_silent(engine, me, long) is None  # not for a minute
    assert adopt_from_silent(engine, me, short, claimed_ahead=True) is not None
    with engine.connect() as conn:
        owners = dict(conn.execute(select(JobLog.task_id, JobLog.manager_id)).all())
    assert owners == {ahead: me, at_slot: peer, retry: peer}
