"""The alerts' routes on the manager's API (guarded by the access token like the others).

GET  /api/v1/alerts/rules         the channels (name, type) and rules in force
GET  /api/v1/alerts/deliveries    ?status ?limit: the latest notices and their deliveries
POST /api/v1/alerts/test          202 {"delivery_id"}; body {"channel"}: a test notice
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ays_runtime.alerts import outbox
from ays_runtime.alerts.service import AlertService

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


def alerts_router(service: AlertService) -> APIRouter:
    router = APIRouter(prefix=API, tags=["alerts"])

    @router.get("/rules")
    def list_rules() -> dict[str, Any]:
        now = datetime.now(UTC)
        settings = service.settings
        return {
            "channels": [{"name": c.name, "type": c.type} for c in settings.channels],
            "rules": [
                {
                    **rule.model_dump(mode="json", exclude={"silences"}),
                    "silenced": rule.silenced(now),
                }
                for rule in settings.rules
            ],
        }

    @router.get("/deliveries", response_model=DeliveryList)
    async def list_deliveries(
        status: Literal["queued", "sent", "failed"] | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> DeliveryList:
        rows = await run_in_threadpool(outbox.recent, service.engine, status, limit)
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
