"""The API routes of what the console shows beyond tasks, runs and nodes: the dashboard's
figures, the fire forecast and a task's slot ledger (the work is done by manager/overview.py,
forecast.py and slots.py; these routes only read the request and call them).

    GET /api/v1/overview                  ?failures ?running: the dashboard's figures
    GET /api/v1/forecast                  ?hours ?threshold ?pileups ?tasks_per_pileup
    GET /api/v1/forecast/tasks            ?at ?limit ?offset: the tasks due in that second
    GET /api/v1/tasks/{id}/slots          ?from ?to ?late_after: every slot and its fate

`router` is included by manager/api.py under /api/v1, behind the same token guard and error
handlers (a ValidationError is a 422 naming the field, NotFoundError a 404).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from ays_runtime.manager import forecast, overview, slots
from ays_runtime.manager.context import ManagerContext
from ays_runtime.manager.schemas import ErrorOut
from ays_runtime.storage.database import utcnow
from ays_runtime.web.fields import Id, Position, UtcIn

DEFAULT_SLOT_RANGE = timedelta(hours=1)
MAX_PAGE = 1000


def _sessions(request: Request) -> Iterator[Session]:
    ctx: ManagerContext = request.app.state.ays
    with ctx.sessions() as session:
        yield session


def _context(request: Request) -> ManagerContext:
    ctx: ManagerContext = request.app.state.ays
    return ctx


DbSession = Annotated[Session, Depends(_sessions)]
Ctx = Annotated[ManagerContext, Depends(_context)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "bad or missing access token"},
    422: {"model": ErrorOut, "description": "a parameter has a bad value (named in the body)"},
    503: {"model": ErrorOut, "description": "the database could not be reached"},
}

router = APIRouter(tags=["insight"], responses=_ERRORS)


@router.get("/overview", response_model=overview.Overview)
def get_overview(
    session: DbSession,
    ctx: Ctx,
    failures: Annotated[int, Query(ge=0, le=100, description="recent failures listed")] = 10,
    running: Annotated[int, Query(ge=0, le=100, description="going runs listed")] = 20,
) -> overview.Overview:
    """The dashboard's figures: nodes per group, runs of the last hour and day by status and
    their success rate, fires and p99 lateness per minute over 24 h, the runs going now,
    recent failures and the managers sharing the database (alive: not stopped and seen
    within manager.silent_after) with the tasks each owns."""
    return overview.overview(
        session,
        manager_silent_after=timedelta(seconds=ctx.config.manager.silent_after),
        failures=failures,
        running=running,
    )


class Managers(BaseModel):
    answered_by: str = Field(description="the manager that answered")
    live: int = Field(description="managers alive now; they divide the enabled tasks")
    managers: list[overview.ManagerAlive]


@router.get("/managers", response_model=Managers)
def get_managers(session: DbSession, ctx: Ctx) -> Managers:
    """The managers sharing this database (scheduler/ownership.py): alive when not stopped
    and seen within manager.silent_after, each with the tasks it owns (timers it holds)."""
    rows = overview.managers(session, utcnow(), timedelta(seconds=ctx.config.manager.silent_after))
    return Managers(answered_by=ctx.manager_id, live=sum(m.alive for m in rows), managers=rows)


@router.get("/forecast", response_model=forecast.Forecast)
def get_forecast(
    session: DbSession,
    hours: Annotated[int, Query(ge=1, le=forecast.MAX_HOURS, description="window")] = (
        forecast.DEFAULT_HOURS
    ),
    threshold: Annotated[
        int, Query(ge=1, le=1_000_000, description="slots due in one second that make a pile-up")
    ] = forecast.DEFAULT_THRESHOLD,
    pileups: Annotated[int, Query(ge=0, le=1000, description="pile-ups listed")] = 20,
    tasks_per_pileup: Annotated[
        int, Query(ge=0, le=MAX_PAGE, description="tasks listed per pile-up")
    ] = 20,
) -> forecast.Forecast:
    """Slots due per minute from now over the window, across all enabled tasks, computed
    from their schedules, with the pile-ups (seconds with at least `threshold` slots due)
    and the tasks behind each."""
    return forecast.forecast(
        session,
        hours=hours,
        threshold=threshold,
        pileups=pileups,
        tasks_per_pileup=tasks_per_pileup,
    )


@router.get("/forecast/tasks", response_model=forecast.TasksAt)
def get_forecast_tasks(
    session: DbSession,
    at: Annotated[UtcIn, Query(description="a second (UTC when no offset is given)")],
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="page size")] = 100,
    offset: Annotated[Position, Query(description="tasks to skip")] = 0,
) -> forecast.TasksAt:
    """The enabled tasks with a slot in the second `at` falls in, by id."""
    return forecast.tasks_at(session, at, limit=limit, offset=offset)


@router.get(
    "/tasks/{task_id:int}/slots",
    response_model=slots.SlotLedger,
    responses={404: {"model": ErrorOut}},
)
def get_slots(
    task_id: Id,
    session: DbSession,
    ctx: Ctx,
    start: Annotated[
        UtcIn | None,
        Query(alias="from", description="first slot time (default: an hour before `to`)"),
    ] = None,
    end: Annotated[
        UtcIn | None, Query(alias="to", description="slots before this (default: now)")
    ] = None,
    late_after: Annotated[
        float, Query(ge=0, le=86_400, description="seconds after its time a fire counts late")
    ] = 1.0,
) -> slots.SlotLedger:
    """Every slot of the task's schedule in [from, to) (at most 10,000) and what became of
    it: fired (with its run), late (by how much), fired once or folded by the misfire
    policy, skipped (by the block strategy, or by the misfire policy `skip`), missed (no
    manager was running), not fired, upcoming; and the ledger's ranges of slots not fired."""
    end = end or utcnow()
    start = start or end - DEFAULT_SLOT_RANGE
    return slots.slot_ledger(
        session,
        task_id,
        start,
        end,
        late_after=timedelta(seconds=late_after),
        grace=timedelta(seconds=ctx.config.manager.misfire_grace),
    )
