"""The schema: migrations, the models' round-trips and the constraints Ays relies on, on SQLite
and on MySQL/MariaDB."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import TypeEngine

from ays_runtime.exceptions import StorageError
from ays_runtime.storage.database import make_engine
from ays_runtime.storage.migrate import alembic_config, current_revision, head_revision, upgrade
from ays_runtime.storage.models import (
    Base,
    JobLog,
    Node,
    NodeGroup,
    NodeSource,
    NodeStatus,
    RunStatus,
    Task,
    TimerRow,
    TriggerKind,
)

T0 = datetime(2026, 11, 23, 8, 30, 15, 123456)  # microseconds must survive every backend


def columns(row: Base) -> dict[str, Any]:
    """Every mapped column of `row`, by attribute name."""
    return {attr.key: getattr(row, attr.key) for attr in inspect(type(row)).column_attrs}


def stored_then_read(sessions: sessionmaker[Session], row: Base) -> Base:
    """Insert `row`, then load it back in a new session (so from the database, not a cache)."""
    with sessions.begin() as session:
        session.add(row)
    with sessions() as session:
        loaded = session.get(type(row), inspect(row).identity)
        assert loaded is not None
        return loaded


def group(name: str = "node_group_ksa") -> NodeGroup:
    return NodeGroup(
        name=name, description="KSA executors", auto_created=True, created_at=T0, updated_at=T0
    )


def task(name: str = "nightly-report", node_group: str = "node_group_ksa", **fields: Any) -> Task:
    required: dict[str, Any] = {
        "schedule": "0 30 2 * * *",
        "payload": {"command": "run-report", "env": {}},
        "created_at": T0,
        "updated_at": T0,
    }
    return Task(name=name, node_group=node_group, **(required | fields))


def slot(scheduled_at: datetime = T0, **fields: Any) -> JobLog:
    return JobLog(task_id=1, scheduled_at=scheduled_at, created_at=T0, **fields)


# --- migrations ---------------------------------------------------------------------------


def test_migrations_bring_an_empty_database_to_the_latest_revision(
    unmigrated_database_url: str,
) -> None:
    assert current_revision(unmigrated_database_url) is None

    upgrade(unmigrated_database_url)

    assert current_revision(unmigrated_database_url) == head_revision()
    engine = make_engine(unmigrated_database_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert tables == set(Base.metadata.tables) | {"alembic_version"}


def test_upgrading_a_database_already_at_the_latest_revision_changes_nothing(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        session.add(group())

    upgrade(database_url)

    assert current_revision(database_url) == head_revision()
    with sessions() as session:
        assert session.scalars(select(NodeGroup.name)).all() == ["node_group_ksa"]


def test_two_managers_upgrading_one_database_at_once_both_succeed(
    unmigrated_database_url: str,
) -> None:
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def manager() -> None:
        start.wait()
        try:
            upgrade(unmigrated_database_url)
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=manager) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    if errors:
        raise errors[0]
    assert current_revision(unmigrated_database_url) == head_revision()


def test_downgrading_to_nothing_and_upgrading_again_gives_the_same_schema(
    database_url: str, engine: Engine
) -> None:
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}

    upgrade(database_url)

    assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}


def _compare_type(
    context: MigrationContext,
    inspected_column: Any,
    metadata_column: Any,
    inspected_type: TypeEngine[Any],
    metadata_type: TypeEngine[Any],
) -> bool | None:
    """Alembic's own comparison, plus DATETIME's fractional digits, which it ignores and
    which the job-log slot key relies on (MySQL's default DATETIME drops microseconds)."""
    wanted = getattr(metadata_type.dialect_impl(context.dialect), "fsp", None)
    if getattr(inspected_type, "fsp", None) != wanted:
        return True
    return None


def test_the_migrated_schema_is_exactly_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": _compare_type})
        differences = compare_metadata(context, Base.metadata)

    assert differences == [], "models.py and the migrations disagree: add a migration"


def test_every_primary_key_is_the_models(engine: Engine) -> None:
    # compare_metadata does not look at primary keys, so they are compared here.
    inspector = inspect(engine)
    migrated = {
        name: inspector.get_pk_constraint(name)["constrained_columns"]
        for name in Base.metadata.tables
    }

    assert migrated == {
        name: [column.name for column in table.primary_key.columns]
        for name, table in Base.metadata.tables.items()
    }


def _information_schema(url: str, *queries: str) -> list[list[Any]]:
    """Each query's rows (tuples), read from `url`'s database."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [[tuple(row) for row in conn.execute(text(query))] for query in queries]
    finally:
        engine.dispose()


def _not_utf8mb4_bin(url: str) -> list[tuple[str, str, str]]:
    """(table, column or '', collation) of every part of Ays's schema not in utf8mb4_bin."""
    tables, columns = _information_schema(
        url,
        "SELECT table_name, '', table_collation FROM information_schema.tables"
        " WHERE table_schema = DATABASE() AND table_name LIKE 'ays\\_%'"
        " AND table_collation <> 'utf8mb4_bin'",
        "SELECT table_name, column_name, collation_name FROM information_schema.columns"
        " WHERE table_schema = DATABASE() AND table_name LIKE 'ays\\_%'"
        " AND collation_name <> 'utf8mb4_bin'",
    )
    return [*tables, *columns]


def test_every_mysql_table_is_innodb_utf8mb4_with_microsecond_datetimes(mysql_url: str) -> None:
    tables, datetimes = _information_schema(
        mysql_url,
        "SELECT table_name, engine FROM information_schema.tables"
        " WHERE table_schema = DATABASE() AND table_name LIKE 'ays\\_%'",
        "SELECT table_name, column_name, datetime_precision FROM information_schema.columns"
        " WHERE table_schema = DATABASE() AND data_type = 'datetime'",
    )

    assert sorted(name for name, _ in tables) == sorted(Base.metadata.tables)
    assert {engine for _, engine in tables} == {"InnoDB"}
    assert _not_utf8mb4_bin(mysql_url) == []
    assert datetimes and {precision for _, _, precision in datetimes} == {6}


@pytest.mark.parametrize("unmigrated_database_url", ["mysql"], indirect=True)
def test_a_mariadb_url_gets_utf8mb4_tables_and_those_it_got_in_latin1_before_are_mended(
    unmigrated_database_url: str,
) -> None:
    """Through a `mariadb+pymysql` URL, SQLAlchemy's "mariadb" dialect skipped the
    migrations' utf8mb4: the tables took the database's latin1 (the test databases' default
    on purpose), which refused a task named in CJK or emoji and folded "Backup" into
    "backup". Such a database is mended by revision 0021; a new one is right from the start."""
    url = make_url(unmigrated_database_url)
    mariadb = url.set(drivername="mariadb+pymysql").render_as_string(hide_password=False)
    # The schema as Ays made it through that URL before: the "mariadb" dialect, up to 0020.
    before = create_engine(url.set(drivername="mariadb+pymysql", query={"charset": "utf8mb4"}))
    try:
        with before.begin() as conn:
            command.upgrade(alembic_config(conn), "0020")
    finally:
        before.dispose()
    assert ("ays_task", "name", "latin1_swedish_ci") in _not_utf8mb4_bin(mariadb)

    upgrade(mariadb)

    assert _not_utf8mb4_bin(mariadb) == []
    engine = make_engine(mariadb)
    try:
        with engine.connect() as conn:  # the foreign keys made again are the models' too
            context = MigrationContext.configure(conn, opts={"compare_type": _compare_type})
            assert compare_metadata(context, Base.metadata) == []
        sessions = sessionmaker(engine, expire_on_commit=False)
        names = ["备份任务 🐳", "Backup", "backup"]
        with sessions.begin() as session:
            session.add(group("节点组 🚀"))
            session.add_all(task(name, node_group="节点组 🚀") for name in names)
        with sessions() as session:
            assert sorted(session.scalars(select(Task.name)).all()) == sorted(names)
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
    finally:
        engine.dispose()

    upgrade(mariadb)  # a new database through the same URL

    assert _not_utf8mb4_bin(mariadb) == []
    assert current_revision(mariadb) == head_revision()


def test_a_database_migrated_by_a_newer_ays_is_refused_with_the_reason(
    database_url: str, engine: Engine
) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))

    with pytest.raises(StorageError, match="'9999', which this version of Ays does not know"):
        upgrade(database_url)


def test_an_unreachable_mysql_server_is_named_without_its_password() -> None:
    url = "mysql+pymysql://ays:s3cret-pw@127.0.0.1:1/ays"

    with pytest.raises(StorageError) as raised:
        upgrade(url)

    message = str(raised.value)
    assert "mysql+pymysql://ays:***@127.0.0.1:1/ays" in message
    assert "cannot connect" in message and "start it" in message
    assert "s3cret-pw" not in message


def test_a_mysql_database_that_does_not_exist_is_named_with_the_fix(mysql_server_url: str) -> None:
    url = make_url(mysql_server_url).set(database="ays_t_missing")

    with pytest.raises(StorageError, match="CREATE DATABASE") as raised:
        upgrade(url.render_as_string(hide_password=False))

    assert f":{url.password}@" not in str(raised.value)


def test_a_sqlite_file_whose_folder_cannot_be_made_is_named(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("")

    with pytest.raises(StorageError, match="cannot create the folder"):
        upgrade(f"sqlite:///{tmp_path / 'not-a-folder' / 'ays.db'}")


# --- round-trips ----------------------------------------------------------------------------


def test_a_node_group_reads_back_as_stored(sessions: sessionmaker[Session]) -> None:
    stored = group()
    expected = columns(stored)

    loaded = stored_then_read(sessions, stored)

    assert columns(loaded) == expected | {"id": loaded.id}


def test_a_task_reads_back_as_stored_with_its_json_payload(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        session.add(group())
    payload = {
        "url": "http://10.0.0.5:8080/jobs/report?day=1",
        "method": "POST",
        "headers": {"X-Trace": "abc", "Accept": "application/json"},
        "body": '{"full": true}',
        "expected_status": [200, 204],
        "nested": {"null": None, "flag": False, "ratio": 0.25, "text": "报表 ✓"},
    }
    stored = task(
        description="daily report",
        timezone="Asia/Riyadh",
        task_type="http",
        payload=payload,
        params="--day=1",
        timeout_s=600,
        retry_count=3,
        retry_backoff="exponential",
        retry_interval_s=0.1,
        allow_concurrent_retry=True,
        route_strategy="round_robin",
        block_strategy="discard_new",
        misfire_policy="fire_once_now",
        enabled=False,
        tags=["billing", "nightly_2"],
        after=[{"task": "extract", "condition": "failure"}],
        after_mode="any",
        version=7,
        updated_at=T0 + timedelta(microseconds=1),
    )
    expected = columns(stored)

    loaded = stored_then_read(sessions, stored)

    assert columns(loaded) == expected | {"id": loaded.id}
    assert loaded.payload == payload


def test_a_task_stored_with_only_its_required_fields_gets_the_defaults(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        session.add(group())

    loaded = stored_then_read(sessions, task())

    assert (loaded.description, loaded.timezone, loaded.task_type) == ("", "UTC", "shell")
    assert (loaded.timeout_s, loaded.retry_count, loaded.retry_interval_s) == (0, 0, 10.0)
    assert loaded.allow_concurrent_retry is False
    assert (loaded.route_strategy, loaded.block_strategy, loaded.misfire_policy) == (
        "first",
        "serial",
        "skip",
    )
    assert loaded.enabled is True and loaded.version == 1 and loaded.params == ""
    assert loaded.tags == []


def test_a_timer_row_reads_back_as_stored(sessions: sessionmaker[Session]) -> None:
    stored = TimerRow(
        manager_id="172.21.16.81:18080",
        task_id=42,  # no foreign key: the task may already be deleted
        schedule="@every 500ms",
        timezone="Europe/Paris",
        version=3,
        next_fire_time=T0 + timedelta(milliseconds=500),
        updated_at=T0,
    )
    expected = columns(stored)

    loaded = stored_then_read(sessions, stored)

    assert columns(loaded) == expected


def test_a_node_reads_back_as_stored(sessions: sessionmaker[Session]) -> None:
    stored = Node(
        ip="2001:db8::5",
        port=18181,
        node_group="node_group_ksa",
        status=NodeStatus.ONLINE.value,
        source=NodeSource.SELF.value,
        version="0.1.0",
        running_jobs=2,
        last_seen=T0,
        created_at=T0,
        updated_at=T0,
    )
    expected = columns(stored)

    loaded = stored_then_read(sessions, stored)

    assert columns(loaded) == expected | {"id": loaded.id}
    assert loaded.address == "2001:db8::5:18181"


def test_a_job_log_reads_back_as_stored(sessions: sessionmaker[Session]) -> None:
    stored = slot(
        trigger=TriggerKind.RETRY.value,
        attempt=2,
        shard_index=1,
        shard_total=3,
        params="--day=1",
        claim="c0ffee",
        manager_id="manager-a",
        node="10.0.0.5:18181",
        status=RunStatus.FAILED.value,
        started_at=T0 + timedelta(microseconds=1),
        ended_at=T0 + timedelta(seconds=3, microseconds=999999),
        exit_code=137,
        output="line 1\nline 2 ✓\n" * 100,
        message="killed after the timeout",
    )
    expected = columns(stored)

    loaded = stored_then_read(sessions, stored)

    assert columns(loaded) == expected | {"id": loaded.id}


# --- constraints ----------------------------------------------------------------------------


def test_a_slot_can_be_claimed_only_once(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        session.add(slot(manager_id="manager-a"))

    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(slot(manager_id="manager-b"))

    with sessions() as session:
        assert session.scalars(select(JobLog.manager_id)).all() == ["manager-a"]


def test_retries_shards_and_slots_a_microsecond_apart_are_distinct_rows(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        session.add_all(
            [
                slot(),
                slot(attempt=1),
                slot(shard_index=1),
                slot(T0 + timedelta(microseconds=1)),
            ]
        )
    with sessions() as session:
        assert len(session.scalars(select(JobLog.id)).all()) == 4


def test_names_in_emoji_and_cjk_are_stored_whole_and_kept_distinct(
    sessions: sessionmaker[Session],
) -> None:
    names = ["备份任务 🐳", "备份任务 🐍", "Backup", "backup", "naïve ünïcode"]
    with sessions.begin() as session:
        session.add(group("节点组 🚀"))
        session.add_all(task(name, node_group="节点组 🚀") for name in names)

    with sessions() as session:
        stored = session.scalars(select(Task.name)).all()
        grouped = session.scalars(select(Task.node_group).distinct()).all()
    assert sorted(stored) == sorted(names)
    assert grouped == ["节点组 🚀"]


def test_every_manager_keeps_its_own_timer_row_for_a_task(sessions: sessionmaker[Session]) -> None:
    def timer(manager_id: str) -> TimerRow:
        return TimerRow(
            manager_id=manager_id,
            task_id=42,
            schedule="*/5 * * * *",
            timezone="UTC",
            version=1,
            updated_at=T0,
        )

    with sessions.begin() as session:
        session.add_all([timer("10.0.0.1:18080"), timer("10.0.0.2:18080")])

    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(timer("10.0.0.1:18080"))


def test_a_task_name_is_unique(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        session.add_all([group(), task()])

    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(task())


def test_a_node_address_is_unique(sessions: sessionmaker[Session]) -> None:
    def node() -> Node:
        return Node(ip="10.0.0.5", port=18181, node_group="g", created_at=T0, updated_at=T0)

    with sessions.begin() as session:
        session.add(node())

    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(node())


def test_a_node_group_used_by_a_task_cannot_be_deleted(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        session.add_all([group(), task()])

    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.delete(session.scalars(select(NodeGroup)).one())

    with sessions() as session:
        assert session.scalars(select(NodeGroup.name)).all() == ["node_group_ksa"]


def test_a_task_in_a_node_group_that_does_not_exist_is_refused(
    sessions: sessionmaker[Session],
) -> None:
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(task(node_group="no_such_group"))


def test_renaming_a_node_group_carries_its_tasks_along(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        session.add_all([group(), task()])

    with sessions.begin() as session:
        session.scalars(select(NodeGroup)).one().name = "node_group_riyadh"

    with sessions() as session:
        assert session.scalars(select(Task.node_group)).one() == "node_group_riyadh"
