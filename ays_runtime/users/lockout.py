"""Limits on guessing console passwords: failed sign-ins counted per user name ("account")
and per source address ("address") in the database, so that every manager of an env counts
them together, and lock-outs past the limits of `console.sign_in` (config.SignInSettings).

A sign-in with a password goes through three steps of a `Limiter` (console/app.py `login`):

    admit      counts the attempt against its name and its address, in one transaction,
               before the password is checked. A name or address locked out is refused
               (a `Refusal`; nothing counted): its password is not checked, so a right
               guess does not get in and argon2's cost is not spent. Otherwise each count
               goes up, and one that reaches its limit starts a lock-out. Counting first
               keeps a burst of parallel guesses to the limit too.
    failed     the password was wrong: the failure goes into the audit trail, with the
               lock-outs this attempt started.
    succeeded  it was right: the name's count and lock-out are cleared, and the attempt is
               taken back from the address's count (a success says nothing of the others
               signing in from that address).

One row of `ays_sign_in_limit` per name or address: `failures` counted since `first_at`; once
`window` seconds have passed since `first_at`, or once a lock-out has ended, counting starts
again. A lock-out is not extended by the attempts it refuses, so the time a page names holds.
Rows age out with the retention purge (`SIGN_IN_LIMITS`, manager/retention.py). A name that
cannot be a user's (service.NAME) gets no row: only its address counts. The password is
never logged, stored or recorded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.audit import trail
from ays_runtime.config import SignInSettings
from ays_runtime.manager.versions import Actor
from ays_runtime.metrics import manager as metrics
from ays_runtime.storage.database import in_session, insert_ignoring_duplicates, utcnow
from ays_runtime.storage.models import SignInLimit
from ays_runtime.users.service import NAME
from ays_runtime.vocabulary import AuditAction, ChangeVia

log = logging.getLogger("ays.sign_in")

ACCOUNT, ADDRESS = "account", "address"
KEY_MAX = 64  # SignInLimit.key
NOT_A_NAME = "(not a user name)"  # who a failure is recorded as when the name is no user's
T = TypeVar("T")


@dataclass(frozen=True)
class Refusal:
    """A sign-in refused: the name (`kind` account) or address is locked out until `until`."""

    kind: str
    until: datetime

    def seconds(self, now: datetime) -> int:
        """Whole seconds until the lock-out ends (for Retry-After), at least 1."""
        return max(1, math.ceil((self.until - now).total_seconds()))

    def message(self, now: datetime) -> str:
        whose = "for this account" if self.kind == ACCOUNT else "from this address"
        return f"Too many failed sign-ins {whose}; try again in {_duration(self.seconds(now))}."


@dataclass(frozen=True)
class Attempt:
    """A sign-in attempt counted: of `name` from `address`, its failures so far by kind, and
    the lock-outs it started (their end, by kind): they hold only if its password is wrong."""

    name: str
    address: str
    counts: dict[str, int] = field(default_factory=dict)
    locks: dict[str, datetime] = field(default_factory=dict)


def _duration(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


def _keys(limits: SignInSettings, name: str, address: str) -> list[tuple[str, str, int]]:
    """(kind, key, limit) of the counts an attempt goes into, the name's first."""
    keys = []
    if limits.max_failures_per_account and NAME.match(name):
        keys.append((ACCOUNT, name, limits.max_failures_per_account))
    if limits.max_failures_per_address and address:
        keys.append((ADDRESS, address[:KEY_MAX], limits.max_failures_per_address))
    return keys


def _in_transaction(sessions: sessionmaker[Session], work: Callable[[Session], T]) -> T:
    """`work(session)`, committed; run again on a deadlock or lock timeout."""
    return in_session(sessions, work, "sign-in limits", commit=True)


def _locked_row(session: Session, kind: str, key: str, now: datetime) -> SignInLimit:
    """The row of (kind, key), made if missing, locked against the other managers' counts
    until the transaction ends."""
    fresh = {"kind": kind, "key": key, "failures": 0, "first_at": now, "last_at": now}
    insert_ignoring_duplicates(session.connection(), SignInLimit, [fresh], keep="kind")
    query = select(SignInLimit).where(SignInLimit.kind == kind, SignInLimit.key == key)
    row = session.scalar(query.with_for_update().execution_options(populate_existing=True))
    assert row is not None  # made above, in this transaction
    return row


class Limiter:
    """The sign-in limits of an env (`console.sign_in`) over its database."""

    def __init__(self, sessions: sessionmaker[Session], limits: SignInSettings) -> None:
        self.sessions, self.limits = sessions, limits

    def admit(self, name: str, address: str) -> Attempt | Refusal:
        """Count a sign-in attempt of `name` from `address` before its password is checked, or
        refuse it if either is locked out (see the module docstring)."""
        limits = self.limits
        window, lockout = timedelta(seconds=limits.window), timedelta(seconds=limits.lockout)

        def work(session: Session) -> Attempt | Refusal:
            now = utcnow()
            rows = [
                (_locked_row(session, kind, key, now), most)
                for kind, key, most in _keys(limits, name, address)
            ]
            for row, _ in rows:
                if row.locked_until is not None and row.locked_until > now:
                    return Refusal(row.kind, row.locked_until)
            attempt = Attempt(name, address)
            for row, most in rows:
                anew = row.failures == 0 or row.locked_until is not None
                if anew or now - row.first_at >= window:
                    row.failures, row.first_at = 1, now
                else:
                    row.failures += 1
                row.last_at = now
                row.locked_until = now + lockout if row.failures >= most else None
                attempt.counts[row.kind] = row.failures
                if row.locked_until is not None:
                    attempt.locks[row.kind] = row.locked_until
            return attempt

        answer = _in_transaction(self.sessions, work)
        if isinstance(answer, Refusal):
            metrics.SIGN_INS.labels("refused").inc()
        return answer

    def failed(self, attempt: Attempt) -> None:
        """Record a wrong password (or unknown name) in the audit trail, with the lock-outs its
        attempt started; logged without the password."""
        name, address = attempt.name, attempt.address
        who = name if NAME.match(name) else NOT_A_NAME
        actor = Actor(who, ChangeVia.CONSOLE, address)
        counts = attempt.counts
        what = {
            "address": address,
            "account_failures": counts.get(ACCOUNT),
            "address_failures": counts.get(ADDRESS),
        }

        def work(session: Session) -> None:
            trail.record(session, actor, AuditAction.SIGN_IN_FAILED, who, after=what)
            for kind, until in attempt.locks.items():
                target = who if kind == ACCOUNT else address
                lock = {"kind": kind, "failures": counts[kind], "until": until.isoformat() + "Z"}
                trail.record(session, actor, AuditAction.SIGN_IN_LOCKED_OUT, target, after=lock)

        _in_transaction(self.sessions, work)
        metrics.SIGN_INS.labels("failed").inc()
        log.info(
            "console: sign-in of %r from %s failed (%s)",
            who,
            address or "an unknown address",
            ", ".join(f"{n} of {kind}" for kind, n in counts.items()) or "not counted",
        )
        for kind, until in attempt.locks.items():
            log.warning(
                "console: %s %r locked out until %s UTC after %d failed sign-ins in %gs; "
                "`aysManager user unlock NAME` ends a name's lock-out sooner",
                kind,
                who if kind == ACCOUNT else address,
                until.isoformat(timespec="seconds"),
                counts[kind],
                self.limits.window,
            )

    def succeeded(self, attempt: Attempt) -> None:
        """Clear the name's failures and lock-out, and take this attempt back from the
        address's count (lifting the lock-out it started there)."""
        name, address = attempt.name, attempt.address

        def work(session: Session) -> None:
            session.execute(
                delete(SignInLimit).where(SignInLimit.kind == ACCOUNT, SignInLimit.key == name)
            )
            if ADDRESS not in attempt.counts:
                return
            key = address[:KEY_MAX]
            row = session.scalar(
                select(SignInLimit)
                .where(SignInLimit.kind == ADDRESS, SignInLimit.key == key)
                .with_for_update()
            )
            if row is not None and row.failures > 0:
                row.failures -= 1
                if row.failures < self.limits.max_failures_per_address:
                    row.locked_until = None

        _in_transaction(self.sessions, work)
        metrics.SIGN_INS.labels("succeeded").inc()


def locked_out(session: Session, names: Collection[str]) -> dict[str, datetime]:
    """When each of `names` that is locked out now gets its sign-in back (user list)."""
    if not names:
        return {}
    rows = session.execute(
        select(SignInLimit.key, SignInLimit.locked_until).where(
            SignInLimit.kind == ACCOUNT,
            SignInLimit.key.in_(list(names)),
            SignInLimit.locked_until > utcnow(),
        )
    ).all()
    return {key: until for key, until in rows if until is not None}


def unlock(session: Session, actor: Actor, name: str) -> SignInLimit | None:
    """End `name`'s lock-out and clear its failures (an admin's call); the row as it was,
    None when there was nothing to clear. Audited when it cleared something; the caller
    commits."""
    row = session.scalar(
        select(SignInLimit).where(SignInLimit.kind == ACCOUNT, SignInLimit.key == name)
    )
    if row is None or row.failures == 0:
        return None
    before = {
        "failures": row.failures,
        "locked_until": row.locked_until.isoformat() + "Z" if row.locked_until else None,
    }
    session.execute(delete(SignInLimit).where(SignInLimit.id == row.id))
    trail.record(session, actor, AuditAction.SIGN_IN_UNLOCKED, name, before=before)
    return row
