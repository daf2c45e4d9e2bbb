"""Workflow pages: the workflows with their latest run, and one workflow as a layered graph
(SVG, server-rendered) with each task's state in its latest run, refreshed by htmx while the
run goes on; starting it and rerunning a failed run go through the API's own routes
(in-process, as nodes.py does), so the console adds no path of its own."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from ays_runtime.console import csrf
from ays_runtime.console.nodes import _api, _error_of
from ays_runtime.console.render import first, in_session, page
from ays_runtime.manager.schemas import WorkflowRunOut, WorkflowView
from ays_runtime.workflows import api as workflow_api
from ays_runtime.workflows import store

router = APIRouter(include_in_schema=False, dependencies=[Depends(csrf.check)])

# The graph's geometry: a column per depth, a row per task of that depth.
BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 210, 46, 60, 22, 12


def layout(run: WorkflowRunOut | None, view: WorkflowView) -> dict[str, Any]:
    """Boxes (x, y, task, status, node) and edges (x1, y1, x2, y2) of the graph's SVG."""
    nodes = run.nodes if run is not None else []
    boxes: dict[str, dict[str, Any]] = {}
    rows: dict[int, int] = {}
    for n in nodes:
        row = rows.get(n.depth, 0)
        rows[n.depth] = row + 1
        boxes[n.task] = {
            "x": PAD + n.depth * (BOX_W + GAP_X),
            "y": PAD + row * (BOX_H + GAP_Y),
            "task": n.task,
            "status": n.status,
            "node": n.node,
            "job": n.job_log_id,
        }
    edges = [
        {
            "x1": boxes[p]["x"] + BOX_W,
            "y1": boxes[p]["y"] + BOX_H / 2,
            "x2": boxes[n.task]["x"],
            "y2": boxes[n.task]["y"] + BOX_H / 2,
        }
        for n in nodes
        for p in n.parents
        if p in boxes
    ]
    width = PAD * 2 + (max(rows, default=0) + 1) * (BOX_W + GAP_X) - GAP_X
    height = PAD * 2 + max(rows.values(), default=1) * (BOX_H + GAP_Y) - GAP_Y
    return {
        "boxes": list(boxes.values()),
        "edges": edges,
        "width": width,
        "height": height,
        "box_w": BOX_W,
        "box_h": BOX_H,
    }


def _view(s: Session, name: str) -> WorkflowView:
    return workflow_api.view(s, store.get_workflow(s, name))


@router.get("/workflows", response_class=HTMLResponse)
async def workflow_list(request: Request) -> HTMLResponse:
    def load(s: Session) -> list[WorkflowView]:
        return [workflow_api.view(s, wf) for wf in store.list_workflows(s)]

    views = await in_session(request, load)
    return page(
        request, "workflows/list.html", views=views, notice=request.query_params.get("notice", "")
    )


@router.get("/workflows/{name}", response_class=HTMLResponse)
async def workflow_page(request: Request, name: str, error: str = "") -> HTMLResponse:
    view = await in_session(request, lambda s: _view(s, name))
    template = (
        "workflows/_graph.html" if request.headers.get("HX-Request") else "workflows/show.html"
    )
    return page(
        request,
        template,
        view=view,
        graph=layout(view.latest_run, view),
        error=error,
        notice=request.query_params.get("notice", ""),
    )


@router.post("/workflows/{name}/start", response_model=None)
async def start(request: Request, name: str) -> Response:
    form = await csrf.form(request)
    params = first(form, "params").strip()
    answer = await _api(
        request, "POST", f"/workflows/{name}/start", {"params": params} if params else {}
    )
    if answer.status_code != 202:
        return await workflow_page(request, name, error=_error_of(answer))
    run = answer.json()
    return RedirectResponse(f"/workflows/{name}?notice=started run {run['id']}", 303)


@router.post("/workflow-runs/{run_id:int}/rerun", response_model=None)
async def rerun(request: Request, run_id: int) -> Response:
    answer = await _api(request, "POST", f"/workflow-runs/{run_id}/rerun")
    if answer.status_code != 202:
        run = await _api(request, "GET", f"/workflow-runs/{run_id}")
        name = run.json().get("workflow", "") if run.is_success else ""
        return await workflow_page(request, name, error=_error_of(answer))
    name = answer.json()["workflow"]
    return RedirectResponse(f"/workflows/{name}?notice=rerunning run {run_id}", 303)
