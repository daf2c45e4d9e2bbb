"""Fixtures shared by the whole suite.

Databases (every test that asks gets its own, fresh and empty; see each fixture):

    database_url              str  migrated database, once on SQLite and once on MySQL/MariaDB
    unmigrated_database_url   str  the same, before any migration (no tables at all)
    engine                    Engine on database_url, disposed after the test
    sessions                  sessionmaker[Session] on engine
    sqlite_url                str  migrated SQLite database, for tests that need no MySQL
    mysql_url                 str  migrated MySQL database, for MySQL-only behaviour
    mysql_server_url          str  AYS_TEST_MYSQL_URL, once the server is known to answer

MySQL/MariaDB tests use the server named by AYS_TEST_MYSQL_URL (scripts/test sets it up).
When it is unset or the server does not answer they are skipped, except under CI (env var
CI set), where that is a failure: CI must never pass by skipping MariaDB. Select or drop them
with `-m mysql` / `-m "not mysql"`: a test using mysql_url or mysql_server_url is marked
`mysql` automatically.
"""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.storage.database import make_engine, redacted, session_factory
from ays_runtime.storage.migrate import upgrade

if TYPE_CHECKING:
    from playwright.sync_api import Page

MYSQL_URL_VAR = "AYS_TEST_MYSQL_URL"
# Per-test databases are named with this prefix; scripts/test grants the test user `ays\_t%`.
MYSQL_DB_PREFIX = "ays_t_"

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("mysql", id="mysql", marks=pytest.mark.mysql),
]


# --- hooks ------------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as a terminal gives it. A suite started in the background (`.ci/run &` in a
    script, nohup) inherits SIGINT ignored and passes that on to every process it starts, so
    the tests that press Ctrl-C (the quick start, `logs --follow`) would see it do nothing:
    Python and bash keep a signal that was ignored when they started ignored."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `mysql` every test that needs the MySQL server, so `-m "not mysql"` drops it."""
    for item in items:
        if {"mysql_url", "mysql_server_url"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mysql)


# --- MySQL/MariaDB server -------------------------------------------------------------------


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in {"", "0", "false", "no"}


def _mysql_unavailable(reason: str) -> NoReturn:
    if _in_ci():
        pytest.fail(f"{reason} (CI is set: MySQL tests must run, not be skipped)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mysql_server_url() -> str:
    """The URL in AYS_TEST_MYSQL_URL, once a connection to its server has succeeded.

    Checked once per session: a skip (or failure under CI) is remembered for every test.
    """
    url = os.environ.get(MYSQL_URL_VAR, "")
    if not url:
        _mysql_unavailable(
            f"{MYSQL_URL_VAR} is not set (e.g. mysql+pymysql://ays_test:ays_test@127.0.0.1:3306"
            "/ays_test); scripts/test sets it and prepares the server"
        )
    engine = create_engine(_server_only(url), connect_args={"connect_timeout": 5})
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as err:
        reason = getattr(err, "orig", None) or err
        _mysql_unavailable(f"MySQL server of {redacted(url)} does not answer: {reason}")
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session")
def _mysql_admin(mysql_server_url: str) -> Iterator[Engine]:
    """A connection pool to the server itself (no default database), to create and drop."""
    engine = create_engine(_server_only(mysql_server_url), pool_size=1)
    yield engine
    engine.dispose()


def _server_only(url: str) -> URL:
    parsed = make_url(url)
    return parsed.set(database=None, query={**parsed.query, "charset": "utf8mb4"})


@contextmanager
def _new_mysql_database(admin: Engine, server_url: str) -> Iterator[str]:
    name = f"{MYSQL_DB_PREFIX}{secrets.token_hex(6)}"
    with admin.begin() as conn:
        # latin1 on purpose: an operator's database may have any default, so every table
        # must declare utf8mb4 itself; the tests then catch a migration that forgets it.
        conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET latin1")
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            # A test that leaks an open transaction must fail the drop, not hang the run.
            conn.exec_driver_sql("SET SESSION lock_wait_timeout = 10")
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")


# --- databases --------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def unmigrated_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new empty database with no tables: a SQLite file in tmp_path, or a MySQL database
    `ays_t_<hex>` created on the AYS_TEST_MYSQL_URL server and dropped after the test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ays.db'}"
        return
    server_url = request.getfixturevalue("mysql_server_url")
    admin = request.getfixturevalue("_mysql_admin")
    with _new_mysql_database(admin, server_url) as url:
        yield url


@pytest.fixture
def database_url(unmigrated_database_url: str) -> str:
    """A fresh, empty database at the latest schema revision; the test runs once per backend
    (ids `sqlite`, `mysql`). The URL holds the password: hand it to code, not to messages."""
    upgrade(unmigrated_database_url)
    return unmigrated_database_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh, migrated SQLite database, for tests that do not need to run on both backends."""
    url = f"sqlite:///{tmp_path / 'ays-sqlite.db'}"
    upgrade(url)
    return url


@pytest.fixture
def mysql_url(mysql_server_url: str, _mysql_admin: Engine) -> Iterator[str]:
    """A fresh, migrated MySQL/MariaDB database, for behaviour SQLite does not have."""
    with _new_mysql_database(_mysql_admin, mysql_server_url) as url:
        upgrade(url)
        yield url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """make_engine(database_url), disposed after the test."""
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    """Sessions on `engine` (expire_on_commit off, as the daemons use them)."""
    return session_factory(engine)


# --- screenshots of the console (browser tests) ----------------------------------------------

DOCS_SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


@pytest.fixture
def shot(tmp_path: Path) -> Callable[[Page, str], None]:
    """Take a screenshot of the page as `name`.png: into the test's temporary directory, or
    into docs/screenshots when AYS_UPDATE_SCREENSHOTS=1 asks to refresh the README's."""
    into = DOCS_SHOTS if os.environ.get("AYS_UPDATE_SCREENSHOTS") == "1" else tmp_path / "shots"
    into.mkdir(parents=True, exist_ok=True)

    def take(page: Page, name: str) -> None:
        page.screenshot(path=str(into / f"{name}.png"), full_page=False)

    return take
