"""The pages that look at the whole platform: the dashboard, the fire forecast (heatmap and
pile-ups) and a task's slot ledger.

Their figures come from `ays_runtime.manager.overview`, `.forecast` and `.slots` (each
module's docstring states its contract); these routes only choose the window, call them in
the thread pool and draw the result.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from ays_runtime.console import csrf
from ays_runtime.console.render import (
    PageNo,
    context_of,
    in_session,
    is_htmx,
    moment_of,
    page,
    page_number,
)
from ays_runtime.exceptions import ValidationError
from ays_runtime.manager import forecast, overview, slots
from ays_runtime.vocabulary import RunStatus

router = APIRouter(include_in_schema=False, dependencies=[Depends(csrf.check)])
SLOT_PAGE = 200
CELL_TASKS = 100


def _epoch(moment: datetime) -> int:
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return int(aware.timestamp())


def _series_chart(
    start: datetime, step: int, series: list[dict[str, Any]], y: str
) -> dict[str, Any]:
    first = _epoch(start)
    count = len(series[0]["values"]) if series else 0
    return {"x": [first + i * step for i in range(count)], "series": series, "y": y}


# --- the dashboard --------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def dashboard(request: Request) -> HTMLResponse:
    silent_after = timedelta(seconds=context_of(request).config.manager.silent_after)
    figures = await in_session(
        request, lambda s: overview.overview(s, manager_silent_after=silent_after)
    )
    timeline = figures.timeline
    fires = _series_chart(
        timeline.start,
        timeline.step_s,
        [{"label": "fires per minute", "values": timeline.fires}],
        "fires",
    )
    lateness = _series_chart(
        timeline.start,
        timeline.step_s,
        [{"label": "p99 lateness (s)", "values": timeline.p99_lateness_s, "color": "#9a6700"}],
        "seconds",
    )
    template = "overview/_dashboard.html" if is_htmx(request) else "overview/dashboard.html"
    return page(
        request,
        template,
        o=figures,
        statuses=[s.value for s in RunStatus],
        fires_chart=fires,
        lateness_chart=lateness,
        fires_total=sum(timeline.fires),
    )


# --- the fire forecast ----------------------------------------------------------------------


@router.get("/forecast", response_class=HTMLResponse)
async def forecast_page(request: Request, threshold: str = "100") -> HTMLResponse:
    limit = int(threshold) if threshold.isdigit() and int(threshold) > 0 else 100
    planned = await in_session(request, lambda s: forecast.forecast(s, threshold=limit))
    top = max(planned.fires) if planned.fires else 0
    # One row per clock hour, one column per minute of the hour: the window's first and last
    # hours are partial (their cells outside it are left empty).
    start = planned.start
    count = len(planned.fires)
    first_hour = start.replace(minute=0)
    hours = []
    for h in range(-(-(count + start.minute) // 60)):
        cells: list[dict[str, Any] | None] = []
        for m in range(60):
            at = first_hour + timedelta(hours=h, minutes=m)
            i = int((at - start).total_seconds()) // 60
            if not 0 <= i < count:
                cells.append(None)
                continue
            n = planned.fires[i]
            level = 0 if n == 0 or top == 0 else 1 + min(4, (5 * n) // (top + 1))
            cells.append({"at": at, "fires": n, "peak": planned.peak_second[i], "level": level})
        hours.append({"at": first_hour + timedelta(hours=h), "cells": cells})
    return page(request, "overview/forecast.html", f=planned, hours=hours, top=top)


@router.get("/forecast/cell", response_class=HTMLResponse)
async def forecast_cell(request: Request, at: str = "", second: str = "0") -> HTMLResponse:
    """The tasks due in one second of a heatmap minute (htmx fragment or page)."""
    minute = moment_of("at", at)
    if minute is None:
        raise ValidationError("at", at, "a date-time such as 2026-05-01T08:00")
    s = int(second) if second.isdigit() and int(second) < 60 else 0
    moment = minute.replace(second=s, microsecond=0)
    due = await in_session(request, lambda db: forecast.tasks_at(db, moment, limit=CELL_TASKS))
    template = "overview/_cell.html" if is_htmx(request) else "overview/cell.html"
    return page(request, template, due=due, minute=minute.replace(second=0), second=s)


# --- the slot ledger ------------------------------------------------------------------------


@router.get("/slots", response_class=HTMLResponse)
async def slot_view(
    request: Request,
    task_id: str = "",
    since: str = "",
    until: str = "",
    page_no: PageNo = "1",
) -> HTMLResponse:
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    start = moment_of("since", since) or now - timedelta(hours=1)
    end = moment_of("until", until) or now + timedelta(minutes=5)
    number = page_number(page_no)
    filters = {
        "task_id": task_id,
        "since": since or start.strftime("%Y-%m-%dT%H:%M:%S"),
        "until": until or end.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    ledger = None
    error = ""
    grace = timedelta(seconds=context_of(request).config.manager.misfire_grace)
    if task_id.isdigit():
        try:
            ledger = await in_session(
                request, lambda s: slots.slot_ledger(s, int(task_id), start, end, grace=grace)
            )
        except ValidationError as err:
            error = str(err)

    shown = ledger.slots[(number - 1) * SLOT_PAGE : number * SLOT_PAGE] if ledger else []
    pages = max(1, -(-len(ledger.slots) // SLOT_PAGE)) if ledger else 1
    return page(
        request,
        "overview/slots.html",
        ledger=ledger,
        shown=shown,
        error=error,
        filters=filters,
        page_no=number,
        pages=pages,
        outcomes=[o.value for o in slots.SlotOutcome],
    )
