"""Bring a database's schema to the latest revision with the Alembic migrations shipped in
this package (`migrations/`); no alembic.ini is needed at run time.

    upgrade(url)            apply every migration not yet applied (idempotent)
    current_revision(url)   the revision the database is at, None if never migrated
    head_revision()         the newest revision this version of Ays knows

Two managers starting at once against one database must not both run a migration half-way:
on MySQL/MariaDB the upgrade runs under the named lock `ays_migrate` (GET_LOCK), on SQLite
inside one `BEGIN IMMEDIATE` write transaction, which SQLite serialises. Every database error
leaves this module as a `StorageError` naming the database (password hidden) and the fix.

Adding a migration: write `migrations/versions/NNNN_slug.py` (revision "NNNN", next number,
down_revision the previous one) in the shape of `migrations/script.py.mako`, with explicit
`op.*` calls; `tests/test_storage.py` checks that the migrated schema equals the models.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, exc, text
from sqlalchemy.engine import make_url

from ays_runtime.exceptions import StorageError
from ays_runtime.storage.database import make_engine, redacted

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Named lock (MySQL GET_LOCK) held while migrating; server-wide, so it also serialises
# migrations of other databases on the same server, which is harmless.
LOCK_NAME = "ays_migrate"
# A first migration of an empty database takes a few seconds at most; a manager still
# waiting after this long is facing a stuck peer, and says so rather than waiting forever.
LOCK_TIMEOUT_S = 60

# MySQL client/server error codes that mean "cannot connect", with the fix for each.
_MYSQL_CONNECT_FIXES = {
    1044: "the user has no rights on this database: GRANT ALL ON <database>.* TO the user",
    1045: "the server refused the user or password: check them in storage.url",
    1049: "the database does not exist: create it (CREATE DATABASE <name> CHARACTER SET "
    "utf8mb4) or fix its name in storage.url",
    2003: "no server answered at this host and port: start it, or fix host/port in storage.url",
    2005: "the host name does not resolve: fix the host in storage.url",
    2013: "the server closed the connection: check that it is a MySQL/MariaDB server",
}


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the package's migrations; `env.py` migrates `connection`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest revision of the shipped migrations."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships 0001
        raise StorageError(f"no migrations found in {MIGRATIONS_DIR}: the installation is broken")
    return head


def current_revision(url: str) -> str | None:
    """The revision `url`'s database is at; None for a database never migrated."""
    engine = make_engine(url)
    try:
        with _connected(engine, url) as conn, _translated(url, "reading the schema revision"):
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def upgrade(url: str) -> None:
    """Apply every migration `url`'s database lacks; a database at the head is left as is.

    Safe to call from several processes at once (see the module docstring). Raises
    StorageError when the database cannot be reached, the lock cannot be had within
    LOCK_TIMEOUT_S, a migration fails, or the database is at a revision this version of Ays
    does not know (it was upgraded by a newer one).
    """
    engine = make_engine(url, pool_size=1)
    try:
        with _connected(engine, url) as conn:
            if conn.dialect.name == "sqlite":
                _upgrade_sqlite(conn, url)
            else:
                _upgrade_mysql(conn, url)
    finally:
        engine.dispose()


def _upgrade_sqlite(conn: Connection, url: str) -> None:
    # pysqlite runs DDL outside transactions unless one is opened by hand. BEGIN IMMEDIATE
    # takes the write lock before alembic reads the current revision, so a second process
    # waits (busy timeout), then sees the finished schema; a failure rolls everything back.
    with _translated(url, "taking the write lock"):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    try:
        _run_upgrade(conn, url)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


def _upgrade_mysql(conn: Connection, url: str) -> None:
    # MySQL DDL commits implicitly, so a transaction cannot make the migration atomic; the
    # named lock makes sure only one process migrates, and the next one finds it done.
    with _translated(url, f"taking the migration lock {LOCK_NAME!r}"):
        got = conn.execute(
            text("SELECT GET_LOCK(:name, :timeout)"),
            {"name": LOCK_NAME, "timeout": LOCK_TIMEOUT_S},
        ).scalar()
        conn.commit()
    if got != 1:
        raise StorageError(
            f"database {redacted(url)}: another process has held the migration lock "
            f"{LOCK_NAME!r} for {LOCK_TIMEOUT_S} s; wait for that manager's upgrade to finish "
            f"(SELECT IS_USED_LOCK('{LOCK_NAME}') gives its connection id) and try again"
        )
    try:
        _run_upgrade(conn, url)
    finally:
        with _translated(url, f"releasing the migration lock {LOCK_NAME!r}"):
            conn.rollback()
            conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": LOCK_NAME})
            conn.commit()


def _run_upgrade(conn: Connection, url: str) -> None:
    with _translated(url, "migrating the schema"):
        try:
            command.upgrade(alembic_config(conn), "head")
        except CommandError as err:
            raise _unknown_revision(conn, url, err) from err


def _unknown_revision(conn: Connection, url: str, err: CommandError) -> StorageError:
    """The usual cause of a CommandError: the database was migrated by a newer Ays."""
    conn.rollback()
    at = MigrationContext.configure(conn).get_current_revision()
    head = head_revision()
    return StorageError(
        f"database {redacted(url)} is at schema revision {at!r}, which this version of Ays "
        f"does not know (its newest is {head!r}): a newer Ays has upgraded it; run that "
        f"version (alembic said: {err})"
    )


@contextmanager
def _connected(engine: Engine, url: str) -> Iterator[Connection]:
    """A connection to `url`, or a StorageError that says why there is none and the fix."""
    try:
        conn = engine.connect()
    except exc.DBAPIError as err:
        raise StorageError(
            f"database {redacted(url)}: cannot connect: {_reason(err, url)}; "
            f"{_connect_fix(err, url)}"
        ) from err
    except exc.SQLAlchemyError as err:
        raise StorageError(
            f"database {redacted(url)}: cannot connect: {_scrub(str(err), url)}"
        ) from err
    with conn:
        yield conn


@contextmanager
def _translated(url: str, doing: str) -> Iterator[None]:
    """SQLAlchemy errors raised while `doing` something become StorageErrors."""
    try:
        yield
    except exc.DBAPIError as err:
        raise StorageError(
            f"database {redacted(url)}: {doing} failed: {_reason(err, url)}; fix the cause "
            f"and run `aysManager db upgrade` again"
        ) from err
    except exc.SQLAlchemyError as err:
        raise StorageError(
            f"database {redacted(url)}: {doing} failed: {_scrub(str(err), url)}"
        ) from err


def _reason(err: exc.DBAPIError, url: str) -> str:
    """The driver's own words, without SQLAlchemy's statement dump and link."""
    orig = err.orig
    args: tuple[Any, ...] = getattr(orig, "args", ())
    if len(args) == 2 and isinstance(args[0], int):  # PyMySQL: (code, message)
        message = f"{args[1]} (MySQL error {args[0]})"
    else:
        message = str(orig) or type(orig).__name__
    return _scrub(message, url)


def _connect_fix(err: exc.DBAPIError, url: str) -> str:
    if make_url(url).get_backend_name() == "sqlite":
        return "check that the file's directory exists and this user may write to it"
    args = getattr(err.orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _MYSQL_CONNECT_FIXES:
        return _MYSQL_CONNECT_FIXES[args[0]]
    return (
        "check host, port, user, password and database name in storage.url, "
        "and that the server is running"
    )


def _scrub(message: str, url: str) -> str:
    """Belt and braces: a driver message must never carry the password out."""
    password = make_url(url).password
    return message.replace(password, "***") if password else message
