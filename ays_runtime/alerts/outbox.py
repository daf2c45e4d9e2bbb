"""The queue of notices (`ays_alert_delivery`): queue, take with a lease, settle.

A row is `queued` until its channel takes it (`sent`) or `alerts.max_attempts` tries have
failed (`failed`). Taking a row moves its `next_at` forward by a lease with a compare-and-set,
so two managers never send the same row at once; a manager that dies holding a lease leaves
the row to be taken again when the lease ends.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update

from ays_runtime.alerts.base import Notice
from ays_runtime.storage.database import insert_ignoring_duplicates, transaction
from ays_runtime.storage.models import AlertDelivery

QUEUED, SENT, FAILED = "queued", "sent", "failed"
LEASE = timedelta(seconds=120)  # longer than any channel's timeout


@dataclass(frozen=True)
class Queued:
    """A notice to queue for `channels`."""

    dedup_key: str
    rule: str
    kind: str
    summary: str
    payload: str
    channels: Sequence[str]


def queue(conn: Connection, notices: Sequence[Queued], now: datetime) -> None:
    """Queue each notice for each of its channels; one already queued (its key) is skipped."""
    rows = [
        {
            "dedup_key": notice.dedup_key[:191],
            "channel": channel,
            "rule": notice.rule,
            "kind": notice.kind,
            "summary": notice.summary[:1024],
            "payload": notice.payload,
            "status": QUEUED,
            "attempts": 0,
            "next_at": now,
            "last_error": "",
            "created_at": now,
        }
        for notice in notices
        for channel in notice.channels
    ]
    if rows:
        insert_ignoring_duplicates(conn, AlertDelivery, rows, keep="dedup_key")


def delivery_id(conn: Connection, dedup_key: str, channel: str) -> int | None:
    return conn.execute(
        select(AlertDelivery.id).where(
            AlertDelivery.dedup_key == dedup_key, AlertDelivery.channel == channel
        )
    ).scalar()


def take_due(engine: Engine, now: datetime, limit: int) -> list[tuple[str, int, Notice]]:
    """Up to `limit` queued rows that are due, leased to the caller: (channel, attempts so
    far, the notice)."""

    def lease(conn: Connection) -> list[tuple[str, int, Notice]]:
        rows = conn.execute(
            select(
                AlertDelivery.id,
                AlertDelivery.channel,
                AlertDelivery.rule,
                AlertDelivery.kind,
                AlertDelivery.summary,
                AlertDelivery.payload,
                AlertDelivery.attempts,
                AlertDelivery.next_at,
            )
            .where(AlertDelivery.status == QUEUED, AlertDelivery.next_at <= now)
            .order_by(AlertDelivery.next_at)
            .limit(limit)
        ).all()
        taken: list[tuple[str, int, Notice]] = []
        for row in rows:
            leased = conn.execute(
                update(AlertDelivery)
                .where(
                    AlertDelivery.id == row.id,
                    AlertDelivery.status == QUEUED,
                    AlertDelivery.next_at == row.next_at,
                )
                .values(next_at=now + LEASE)
            ).rowcount
            if leased:
                notice = Notice(row.id, row.rule, row.kind, row.summary, row.payload)
                taken.append((row.channel, row.attempts, notice))
        return taken

    return transaction(engine, lease, "manager: alerts: leasing the notices due")


def settle(
    engine: Engine, delivery: int, now: datetime, error: str | None, retry_at: datetime | None
) -> None:
    """Book one try: taken (`error` None), failed and tried again at `retry_at`, or failed
    for good (`retry_at` None)."""
    values: dict[str, Any] = {"attempts": AlertDelivery.attempts + 1}
    if error is None:
        values |= {"status": SENT, "sent_at": now, "last_error": ""}
    elif retry_at is not None:
        values |= {"next_at": retry_at, "last_error": error[:1024]}
    else:
        values |= {"status": FAILED, "last_error": error[:1024]}
    # Guarded by the status: tried again after a lost commit, a sent or failed row is not
    # booked twice (a try put off to `retry_at` may count one attempt more).
    booked = (
        update(AlertDelivery)
        .where(AlertDelivery.id == delivery, AlertDelivery.status == QUEUED)
        .values(**values)
    )
    transaction(engine, lambda conn: conn.execute(booked), f"manager: alerts: booking {delivery}")


def next_due(engine: Engine) -> datetime | None:
    """When the earliest queued row is due (None: nothing queued)."""
    with engine.connect() as conn:
        return conn.execute(
            select(func.min(AlertDelivery.next_at)).where(AlertDelivery.status == QUEUED)
        ).scalar()


def recent(
    engine: Engine, status: str | None, limit: int, since: datetime | None = None
) -> list[dict[str, Any]]:
    """The latest deliveries (created at or after `since`, naive UTC), newest first."""
    stmt = select(*AlertDelivery.__table__.c).order_by(AlertDelivery.id.desc()).limit(limit)
    if status is not None:
        stmt = stmt.where(AlertDelivery.status == status)
    if since is not None:
        stmt = stmt.where(AlertDelivery.created_at >= since)
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(stmt).mappings()]


def open_alerts(engine: Engine, since: datetime, limit: int = 2000) -> list[dict[str, Any]]:
    """What fired since `since` and has not been resolved since, newest first: for each rule
    and subject (a node, a group, a run, a task), its latest firing or resolved notice, when
    that is a firing one. A run's own notices (a long run, a late start) have no resolved one:
    they stay open until `since` passes them."""
    stmt = (
        select(
            AlertDelivery.rule,
            AlertDelivery.dedup_key,
            AlertDelivery.kind,
            AlertDelivery.summary,
            AlertDelivery.payload,
            AlertDelivery.created_at,
        )
        .where(AlertDelivery.kind.in_(("firing", "resolved")), AlertDelivery.created_at >= since)
        .order_by(AlertDelivery.id.desc())
        .limit(limit)
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    seen: set[tuple[str, str]] = set()
    found = []
    for rule, key, kind, summary, payload, created_at in rows:
        subject = _subject(payload, key)
        if (rule, subject) in seen:
            continue
        seen.add((rule, subject))
        if kind == "firing":
            found.append(
                {"rule": rule, "subject": subject, "summary": summary, "since": created_at}
            )
    return found


def _subject(payload: str, key: str) -> str:
    try:
        document = json.loads(payload)
    except ValueError:
        return key
    if document.get("subject"):
        return str(document["subject"])
    task = document.get("task")
    return f"task {task.get('id')}" if isinstance(task, dict) else key
