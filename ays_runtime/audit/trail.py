"""Writing, reading and purging the audit trail (see the package's docstring)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import AuditEntry
from ays_runtime.vocabulary import AuditAction

if TYPE_CHECKING:  # the task service imports this module: no cycle at run time
    from ays_runtime.manager.versions import Actor

WHO_MAX, SOURCE_MAX, TARGET_MAX = 128, 64, 255  # AuditEntry's columns


def record(
    session: Session,
    actor: Actor,
    action: AuditAction,
    target: str,
    *,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> AuditEntry:
    """Add an entry for a change made in `session`'s transaction (not committed)."""
    entry = AuditEntry(
        at=utcnow(),
        who=actor.who[:WHO_MAX],
        via=actor.via.value,
        source=actor.source[:SOURCE_MAX],
        action=action.value,
        target_type=action.target_type,
        target=target[:TARGET_MAX],
        before=dict(before) if before is not None else None,
        after=dict(after) if after is not None else None,
    )
    session.add(entry)
    return entry


def changed_fields(entry: AuditEntry) -> list[str]:
    """The keys whose value the change set, removed or altered (all of them on a creation or
    a deletion, none for an action with no definition, such as a kill)."""
    before, after = entry.before or {}, entry.after or {}
    keys = list(after) + [k for k in before if k not in after]
    return [k for k in keys if before.get(k, _MISSING) != after.get(k, _MISSING)]


_MISSING = object()


def entries(
    session: Session,
    *,
    target_type: str | None = None,
    target: str | None = None,
    who: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[AuditEntry], int]:
    """Entries matching every filter given (`who` matches a part of the name), newest
    first, with the total count of matches. Times are naive UTC."""
    where = []
    if target_type:
        where.append(AuditEntry.target_type == target_type)
    if target:
        where.append(AuditEntry.target == target)
    if who:
        where.append(AuditEntry.who.contains(who, autoescape=True))
    if action:
        where.append(AuditEntry.action == action)
    if since is not None:
        where.append(AuditEntry.at >= since)
    if until is not None:
        where.append(AuditEntry.at < until)
    total = session.scalar(select(func.count()).select_from(AuditEntry).where(*where)) or 0
    query = select(AuditEntry).where(*where).order_by(AuditEntry.id.desc())
    return list(session.scalars(query.limit(limit).offset(offset))), total
