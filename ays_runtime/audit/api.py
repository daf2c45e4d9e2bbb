"""GET /api/v1/audit: the audit trail, newest first, filtered and paged."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from ays_runtime.audit import trail
from ays_runtime.manager.schemas import ErrorOut
from ays_runtime.manager.versions import Actor
from ays_runtime.protocol import ACTOR_HEADER
from ays_runtime.storage.models import AuditEntry
from ays_runtime.vocabulary import AuditAction, ChangeVia
from ays_runtime.web.fields import Position, UtcIn, UtcOut

MAX_PAGE, DEFAULT_PAGE = 1000, 100
ACTOR_NAME_MAX = 64


def request_actor(request: Request) -> Actor:
    """Who makes this request's changes, and the address it calls from: the user whose
    personal token it is; for the env's shared token, its holder by the name it gives if any
    (`X-Ays-Actor`)."""
    source = request.client.host if request.client else ""
    caller = getattr(request.state, "caller", None)
    if caller is not None and caller.user_id is not None:
        return Actor(caller.name, ChangeVia.API, source)
    named = "".join(c for c in request.headers.get(ACTOR_HEADER, "") if c.isprintable())
    named = named.strip()[:ACTOR_NAME_MAX]
    return Actor(f"{named} (token)" if named else "token", ChangeVia.API, source)


Who = Annotated[Actor, Depends(request_actor)]
TARGET_TYPES = sorted({action.target_type for action in AuditAction})


class AuditEntryOut(BaseModel):
    id: int
    at: UtcOut
    who: str = Field(
        description="the user; for the env's token, 'token' or the name a caller gave with it"
    )
    via: str = Field(description="api, console, apply, rollback")
    source: str = Field(description="the caller's address ('' when none)")
    action: AuditAction
    target_type: str = Field(description=", ".join(TARGET_TYPES))
    target: str = Field(description="the name of what changed, or 'run ID' / 'IP:PORT'")
    changed_fields: list[str] = Field(description="the keys the change set or altered")
    before: dict[str, Any] | None = Field(description="the definition before (null: none)")
    after: dict[str, Any] | None = Field(
        description="the definition after (null: deleted); for a trigger or a kill, what it did"
    )


class AuditPage(BaseModel):
    items: list[AuditEntryOut] = Field(description="newest first")
    total: int


router = APIRouter(
    prefix="/audit",
    tags=["audit"],
    responses={
        401: {"model": ErrorOut, "description": "bad or missing access token"},
        422: {"model": ErrorOut, "description": "a field has a bad value (named in the body)"},
        503: {"model": ErrorOut, "description": "the database could not be reached"},
    },
)


def entry_out(entry: AuditEntry) -> AuditEntryOut:
    return AuditEntryOut(
        id=entry.id,
        at=entry.at,
        who=entry.who,
        via=entry.via,
        source=entry.source,
        action=AuditAction(entry.action),
        target_type=entry.target_type,
        target=entry.target,
        changed_fields=trail.changed_fields(entry),
        before=entry.before,
        after=entry.after,
    )


@router.get("", response_model=AuditPage)
def audit_trail(
    request: Request,
    target_type: Annotated[
        str | None, Query(description=f"one of: {', '.join(TARGET_TYPES)}", max_length=16)
    ] = None,
    target: Annotated[
        str | None, Query(description="a task's or group's name, 'run ID', 'IP:PORT'")
    ] = None,
    who: Annotated[str | None, Query(description="part of who made the change")] = None,
    action: AuditAction | None = None,
    since: Annotated[UtcIn | None, Query(description="at or after (UTC when no offset)")] = None,
    until: Annotated[UtcIn | None, Query(description="before (UTC when no offset)")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="page size")] = DEFAULT_PAGE,
    offset: Annotated[Position, Query(description="rows to skip")] = 0,
) -> AuditPage:
    """Every change made through the API, the console or `apply`, and every trigger and
    kill: who, through what, from where, when, and the definition before and after."""
    with request.app.state.ays.sessions() as session:
        items, total = trail.entries(
            session,
            target_type=target_type,
            target=target,
            who=who,
            action=action.value if action else None,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
        )
        return AuditPage(items=[entry_out(e) for e in items], total=total)
