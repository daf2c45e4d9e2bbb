"""The alerts' routes on the manager's API (guarded by the access token like the others).

GET    /api/v1/alerts/rules            the channels and rules in force, each with its source
                                       (env: the env file's, read-only; api: made here)
POST   /api/v1/alerts/rules            201: a rule (AlertRule's fields)
PUT    /api/v1/alerts/rules/{name}     a rule's settings, replaced (its name stays)
DELETE /api/v1/alerts/rules/{name}     204
POST   /api/v1/alerts/rules/{name}/silences   201; {"minutes"} or {"start", "end"}
DELETE /api/v1/alerts/rules/{name}/silences   {"ended"}: its silences end now
GET    /api/v1/alerts/channels         {"items"}: the channels, secrets shown as set or not
POST   /api/v1/alerts/channels         201: a channel (webhook or email fields)
PUT    /api/v1/alerts/channels/{name}  replaced; without its secret field the secret is kept
DELETE /api/v1/alerts/channels/{name}  204; 409 while a rule notifies it
GET    /api/v1/alerts/silences         {"items"}: silences set here that have not ended
GET    /api/v1/alerts/open             ?hours: what fired and has not been resolved
GET    /api/v1/alerts/deliveries       ?status ?since ?limit: the latest notices, deliveries
POST   /api/v1/alerts/test             202 {"delivery_id"}; body {"channel"}: a test notice

Changes are audited (who, before, after; never a secret) and in force at once on this
manager, within a few seconds on the others (`service.POLICY_REFRESH`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Body, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ays_runtime.alerts import outbox, policies
from ays_runtime.alerts.service import AlertService
from ays_runtime.audit.api import Who
from ays_runtime.exceptions import ValidationError
from ays_runtime.manager.schemas import ErrorOut
from ays_runtime.storage import database
from ays_runtime.storage.database import utcnow
from ays_runtime.web.fields import UtcIn

T = TypeVar("T")
Document = Annotated[dict[str, Any], Body(description="the item's fields (a JSON object)")]

API = "/api/v1/alerts"


class TestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channel: str = Field(min_length=1, max_length=64, description="the channel's name")


class TestQueued(BaseModel):
    delivery_id: int


class DeliveryOut(BaseModel):
    id: int
    channel: str
    rule: str
    kind: str
    summary: str
    status: str
    attempts: int
    next_at: datetime
    last_error: str
    created_at: datetime
    sent_at: datetime | None


class DeliveryList(BaseModel):
    items: list[DeliveryOut]


class SilenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    minutes: float | None = Field(
        None, gt=0, le=366 * 24 * 60, description="from now, this long (or start and end)"
    )
    start: UtcIn | None = Field(None, description="when it starts (default: now)")
    end: UtcIn | None = Field(None, description="when it ends (or minutes)")


def alerts_router(service: AlertService) -> APIRouter:
    # A rule or channel named in the path may not exist (404), or come from the env file,
    # which the API does not change (409).
    router = APIRouter(
        prefix=API,
        tags=["alerts"],
        responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}},
    )

    env = service.env_settings

    def sessions() -> Session:
        return Session(service.engine, expire_on_commit=False)

    async def in_session(work: Callable[[Session], T]) -> T:
        # Tried again on a transient database error; `work` commits what it writes.
        return await run_in_threadpool(
            database.in_session, sessions, work, "manager: the alerts API", commit=False
        )

    async def changed(work: Callable[[Session], T]) -> T:
        result = await in_session(work)
        await service.reload()
        return result

    @router.get("/rules")
    async def list_rules() -> dict[str, Any]:
        return await in_session(lambda s: policies.describe(s, env, utcnow()))

    @router.post("/rules", status_code=201)
    async def create_rule(body: Document, who: Who) -> dict[str, Any]:
        return await changed(lambda s: policies.create_rule(s, env, body, who))

    @router.put("/rules/{name}")
    async def update_rule(name: str, body: Document, who: Who) -> dict[str, Any]:
        return await changed(lambda s: policies.update_rule(s, env, name, body, who))

    @router.delete("/rules/{name}", status_code=204)
    async def delete_rule(name: str, who: Who) -> Response:
        await changed(lambda s: policies.delete_rule(s, env, name, who))
        return Response(status_code=204)

    @router.post("/rules/{name}/silences", status_code=201)
    async def silence_rule(name: str, body: SilenceIn, who: Who) -> dict[str, Any]:
        now = utcnow()
        start = body.start or now
        if body.end is not None:
            end = body.end
        elif body.minutes is not None:
            end = start + timedelta(minutes=body.minutes)
        else:
            raise ValidationError("minutes", None, "how long, in minutes (or give end)")
        return await changed(lambda s: policies.silence(s, env, name, start, end, who))

    @router.delete("/rules/{name}/silences")
    async def unsilence_rule(name: str, who: Who) -> dict[str, int]:
        return {"ended": await changed(lambda s: policies.unsilence(s, env, name, who))}

    @router.get("/silences")
    async def list_silences() -> dict[str, Any]:
        return {"items": await in_session(lambda s: policies.silences(s, None, utcnow()))}

    @router.get("/channels")
    async def list_channels() -> dict[str, Any]:
        described = await in_session(lambda s: policies.describe(s, env, utcnow()))
        return {"items": described["channels"]}

    @router.post("/channels", status_code=201)
    async def create_channel(body: Document, who: Who) -> dict[str, Any]:
        return await changed(lambda s: policies.create_channel(s, env, body, who))

    @router.put("/channels/{name}")
    async def update_channel(name: str, body: Document, who: Who) -> dict[str, Any]:
        return await changed(lambda s: policies.update_channel(s, env, name, body, who))

    @router.delete("/channels/{name}", status_code=204)
    async def delete_channel(name: str, who: Who) -> Response:
        await changed(lambda s: policies.delete_channel(s, env, name, who))
        return Response(status_code=204)

    @router.get("/open")
    async def open_alerts(
        hours: Annotated[float, Query(gt=0, le=24 * 366, description="looking back")] = 24,
    ) -> dict[str, Any]:
        since = utcnow() - timedelta(hours=hours)
        rows = await run_in_threadpool(outbox.open_alerts, service.engine, since)
        return {"items": [_utc(row) for row in rows]}

    @router.get("/deliveries", response_model=DeliveryList)
    async def list_deliveries(
        status: Literal["queued", "sent", "failed"] | None = None,
        since: Annotated[UtcIn | None, Query(description="created at or after")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> DeliveryList:
        rows = await run_in_threadpool(outbox.recent, service.engine, status, limit, since)
        return DeliveryList(items=[DeliveryOut.model_validate(_utc(row)) for row in rows])

    @router.post("/test", status_code=202, response_model=TestQueued)
    async def send_test(body: TestRequest) -> TestQueued:
        return TestQueued(delivery_id=await service.test(body.channel))

    return router


def _utc(row: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value.replace(tzinfo=UTC) if isinstance(value, datetime) else value
        for key, value in row.items()
    }
