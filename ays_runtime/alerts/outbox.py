"""The queue of notices (`ays_alert_delivery`): queue, take with a lease, settle.

A row is `queued` until its channel takes it (`sent`) or `alerts.max_attempts` tries have
failed (`failed`). Taking a row moves its `next_at` forward by a lease with a compare-and-set,
so two managers never send the same row at once; a manager that dies holding a lease leaves
the row to be taken again when the lease ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update

from ays_runtime.alerts.base import Notice
from ays_runtime.storage.database import insert_ignoring_duplicates
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
    taken: list[tuple[str, int, Notice]] = []
    with engine.begin() as conn:
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
    with engine.begin() as conn:
        conn.execute(update(AlertDelivery).where(AlertDelivery.id == delivery).values(**values))


def next_due(engine: Engine) -> datetime | None:
    """When the earliest queued row is due (None: nothing queued)."""
    with engine.connect() as conn:
        return conn.execute(
            select(func.min(AlertDelivery.next_at)).where(AlertDelivery.status == QUEUED)
        ).scalar()


def recent(engine: Engine, status: str | None, limit: int) -> list[dict[str, Any]]:
    """The latest deliveries, newest first."""
    stmt = select(*AlertDelivery.__table__.c).order_by(AlertDelivery.id.desc()).limit(limit)
    if status is not None:
        stmt = stmt.where(AlertDelivery.status == status)
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(stmt).mappings()]
