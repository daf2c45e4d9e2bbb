"""Engines and sessions for SQLite (embedded default) and MySQL/MariaDB (production)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.exceptions import StorageError
from ays_runtime.retry import retry_call

T = TypeVar("T")

# Seconds a SQLite connection waits for another process's lock before "database is locked".
SQLITE_BUSY_TIMEOUT_S = 30


def utcnow() -> datetime:
    """Naive UTC now: the form every datetime column stores."""
    return datetime.now(UTC).replace(tzinfo=None)


def make_engine(url: str, pool_size: int = 10) -> Engine:
    """An engine with the settings Ays relies on for `url`'s dialect.

    SQLite: foreign keys on, WAL so readers do not block the firing writer, a busy timeout
    so two processes sharing the file wait instead of failing. MySQL: utf8mb4 and pre-ping;
    a `mariadb+pymysql` URL is the same server through the same dialect.
    Raises StorageError when the SQLite file's folder cannot be created.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StorageError(
                    f"database {redacted(url)}: cannot create the folder {folder}: "
                    f"{err.strerror}; create it (writable by this user) or fix storage.url"
                ) from err
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            try:
                cur.execute("PRAGMA foreign_keys=ON")
                _use_wal(cur, SQLITE_BUSY_TIMEOUT_S)
                cur.execute("PRAGMA synchronous=NORMAL")
            finally:
                cur.close()

        return engine
    # MariaDB is spoken to through SQLAlchemy's "mysql" dialect, the one the migrations and
    # the tests use: its "mariadb" dialect skips the migrations' mysql_charset/mysql_collate,
    # so the tables took the database's default character set (latin1 on many servers).
    if parsed.drivername == "mariadb+pymysql":
        parsed = parsed.set(drivername="mysql+pymysql")
    query = dict(parsed.query)
    query.setdefault("charset", "utf8mb4")
    return create_engine(
        parsed.set(query=query),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=3600,
    )


# MySQL/MariaDB errors that roll back (or lose) the whole transaction, whose second try can
# succeed: 1213 deadlock (InnoDB chose this transaction as the victim), 1205 lock wait
# timeout, 2006 server has gone away, 2013 lost connection during the query.
TRANSIENT_MYSQL_ERRORS = frozenset({1213, 1205, 2006, 2013})
# Attempts of one transaction that meets such errors (with the retry policy's backoff).
TRANSACTION_ATTEMPTS = 5


def is_transient(err: BaseException) -> bool:
    """Whether a database error says "try the transaction again" rather than "it is wrong":
    a MySQL deadlock, lock wait timeout or lost connection, a SQLite lock held past the busy
    timeout, or a connection SQLAlchemy found broken; also our StorageError raised from one
    (the services translate at their boundary, the retry still sees what it was)."""
    if isinstance(err, StorageError) and err.__cause__ is not None:
        return is_transient(err.__cause__)
    if not isinstance(err, DBAPIError):
        return False
    if err.connection_invalidated:
        return True
    orig = err.orig
    if isinstance(orig, sqlite3.OperationalError):
        return "locked" in str(orig) or "busy" in str(orig)
    code = orig.args[0] if orig is not None and orig.args else None
    return code in TRANSIENT_MYSQL_ERRORS


def transaction(engine: Engine, work: Callable[[Connection], T], what: str) -> T:
    """`work(conn)` in a transaction of its own, run again from the start (the database has
    rolled it back) when it fails with a transient error (`is_transient`), up to
    TRANSACTION_ATTEMPTS times. `work` must be safe to run again: every write of Ays is a
    guarded UPDATE or a keyed INSERT, so a transaction whose COMMIT was lost with its
    connection changes nothing the second time. Blocking: for worker threads."""

    def once() -> T:
        with engine.begin() as conn:
            return work(conn)

    return retry_call(once, is_transient, what, attempts=TRANSACTION_ATTEMPTS)


def take_write_lock(conn: Connection) -> None:
    """Make the rest of a transaction that reads rows, then writes what it decided from them,
    see no other writer between its read and its writes. Called first in the transaction.
    SQLite: take the database's write lock now (BEGIN IMMEDIATE; pysqlite would begin only at
    the first write, leaving the read outside the transaction). MySQL: nothing; the read
    locks its rows itself (SELECT ... FOR UPDATE)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def in_session(
    sessions: Callable[[], Session], work: Callable[[Session], T], what: str, *, commit: bool
) -> T:
    """`work(session)` in a session of its own (committed after it when `commit`; else `work`
    commits what it writes), run again from the start in a new session when it fails with a
    transient error (`is_transient`), up to TRANSACTION_ATTEMPTS times: the API's and the
    console's writes. A deadlock or lock wait timeout rolled the work back, so the second try
    starts clean. A COMMIT lost with its connection may have happened: the second try then
    meets its own change (an update changes nothing, a create answers that the name exists).
    Blocking: for worker threads."""

    def once() -> T:
        with sessions() as session:
            out = work(session)
            if commit:
                session.commit()
            return out

    return retry_call(once, is_transient, what, attempts=TRANSACTION_ATTEMPTS)


def _use_wal(cur: sqlite3.Cursor, wait_s: float) -> None:
    """Switch the file to WAL. While another connection is switching or writing a new file,
    the switch fails at once with "database is locked" (SQLite does not busy-wait for it),
    so it is retried for up to `wait_s` seconds, like any other lock."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def insert_ignoring_duplicates(
    conn: Connection, model: Any, rows: list[dict[str, Any]], *, keep: str
) -> None:
    """INSERT `rows` into `model`'s table; a row whose unique key exists is silently skipped.

    `keep` names a column of the table: MySQL's "do nothing" on a duplicate key is assigning
    a column to itself (unlike INSERT IGNORE, it does not also swallow bad values or
    truncation)."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        conn.execute(sqlite.insert(model).on_conflict_do_nothing(), rows)
    elif dialect in ("mysql", "mariadb"):
        stmt = mysql.insert(model)
        conn.execute(stmt.on_duplicate_key_update({keep: stmt.table.c[keep]}), rows)
    else:  # pragma: no cover - config validation admits only the two
        raise NotImplementedError(dialect)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def redacted(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)
