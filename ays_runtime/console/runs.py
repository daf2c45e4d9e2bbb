"""Run pages: the list (filters task, status, node, time range; paging), a run's page (status
timeline, exit code, message, live output, kill, re-run) and its output stream.

The output is `ManagerContext.run_output` (manager/output.py), the same the API's
/api/v1/job-logs/{id}/output[/stream] read: live from the node while the run goes, then the
excerpt stored in the job log. The console's stream is the API's server-sent events behind
the session instead of the token (a browser's EventSource cannot send a bearer header).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from ays_runtime.console import csrf
from ays_runtime.console.render import (
    PAGE_SIZE,
    PageNo,
    audit_done,
    context_of,
    first,
    in_session,
    is_htmx,
    moment_of,
    page,
    page_number,
)
from ays_runtime.exceptions import ConflictError, ValidationError
from ays_runtime.manager import tasks
from ays_runtime.storage.models import JobLog, RunStatus, Task
from ays_runtime.vocabulary import AuditAction

router = APIRouter(include_in_schema=False, dependencies=[Depends(csrf.check)])
STATUSES = [s.value for s in RunStatus]
RANGES = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7)}


@router.get("/runs", response_class=HTMLResponse)
async def run_list(
    request: Request,
    task_id: str = "",
    status: str = "",
    node: str = "",
    range: str = "",
    since: str = "",
    until: str = "",
    page_no: PageNo = "1",
) -> HTMLResponse:
    number = page_number(page_no)
    start, end = moment_of("since", since), moment_of("until", until)
    if range in RANGES:
        start = datetime.now(UTC).replace(tzinfo=None) - RANGES[range]
    task = int(task_id) if task_id.isdigit() else None
    if status and status not in STATUSES:
        raise ValidationError("status", status, f"one of {', '.join(STATUSES)}")

    def load(s: Session) -> tuple[list[JobLog], int, dict[int, str]]:
        items, total = tasks.list_job_logs(
            s,
            task_id=task,
            status=status or None,
            node=node or None,
            since=start,
            until=end,
            limit=PAGE_SIZE,
            offset=(number - 1) * PAGE_SIZE,
        )
        return items, total, task_names(s, {i.task_id for i in items})

    items, total, names = await in_session(request, load)
    context: dict[str, Any] = {
        "items": items,
        "total": total,
        "names": names,
        "statuses": STATUSES,
        "filters": {
            "task_id": task_id,
            "status": status,
            "node": node,
            "range": range,
            "since": since,
            "until": until,
        },
        "page_no": number,
        "pages": max(1, -(-total // PAGE_SIZE)),
    }
    template = "runs/_table.html" if is_htmx(request) else "runs/list.html"
    return page(request, template, **context)


def task_names(session: Session, ids: set[int]) -> dict[int, str]:
    """The names of these tasks (a deleted task has none)."""
    if not ids:
        return {}
    rows = session.execute(select(Task.id, Task.name).where(Task.id.in_(ids)))
    return {task_id: name for task_id, name in rows}


def timeline(run: JobLog) -> list[dict[str, Any]]:
    """pending -> dispatched -> running -> final, each with its time when known."""
    status = RunStatus(run.status)
    steps: list[dict[str, Any]] = [
        {"status": "pending", "at": run.created_at, "done": True, "node": ""}
    ]
    reached_node = status is not RunStatus.PENDING and bool(run.node)
    steps.append({"status": "dispatched", "at": None, "done": reached_node, "node": run.node})
    steps.append(
        {"status": "running", "at": run.started_at, "done": run.started_at is not None, "node": ""}
    )
    if status.is_final:
        steps.append({"status": status.value, "at": run.ended_at, "done": True, "node": ""})
    else:
        steps.append({"status": "final", "at": None, "done": False, "node": ""})
    return steps


@router.get("/runs/{job_log_id:int}", response_class=HTMLResponse)
async def run_page(request: Request, job_log_id: int) -> HTMLResponse:
    def load(s: Session) -> tuple[JobLog, dict[int, str]]:
        run = tasks.get_job_log(s, job_log_id)
        return run, task_names(s, {run.task_id})

    run, names = await in_session(request, load)
    chunk = await context_of(request).run_output.read(job_log_id, 0)
    template = "runs/_summary.html" if is_htmx(request) else "runs/detail.html"
    return page(
        request,
        template,
        run=run,
        task_name=names.get(run.task_id, ""),
        steps=timeline(run),
        final=RunStatus(run.status).is_final,
        output=chunk,
        notice=request.query_params.get("notice", ""),
    )


@router.get("/runs/{job_log_id:int}/output/stream")
async def output_stream(request: Request, job_log_id: int, offset: int = 0) -> StreamingResponse:
    """The run's output, followed (server-sent events: `output`, `status`, `end`)."""
    run_output = context_of(request).run_output
    await run_output.read(job_log_id, max(offset, 0))  # a 404 before the stream starts

    async def events() -> AsyncIterator[str]:
        async for event in run_output.follow(job_log_id, max(offset, 0)):
            yield event.sse()
            if await request.is_disconnected():
                return

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/runs/{job_log_id:int}/kill")
async def kill(request: Request, job_log_id: int) -> Response:
    form = await csrf.form(request)
    reason = (first(form, "reason") or "killed from the console")[:512]
    killed, status, detail = await context_of(request).kill_run(job_log_id, reason)
    if not killed:
        raise ConflictError(f"{detail} (status {status}): nothing to kill")
    killing = {"reason": reason, "status": status, "detail": detail}
    await audit_done(request, AuditAction.RUN_KILLED, f"run {job_log_id}", killing)
    return RedirectResponse(f"/runs/{job_log_id}?notice=kill sent", status_code=303)


@router.post("/runs/{job_log_id:int}/rerun")
async def rerun(request: Request, job_log_id: int) -> Response:
    """Fire the run's task again now, with the params this run had."""
    run = await in_session(request, lambda s: tasks.get_job_log(s, job_log_id))
    task = await in_session(request, lambda s: tasks.get_task(s, run.task_id))
    new_id = await context_of(request).trigger_now(run.task_id, run.params)
    fired = {"job_log_id": new_id, "params": run.params, "rerun_of": job_log_id}
    await audit_done(request, AuditAction.TASK_TRIGGERED, task.name, fired)
    return RedirectResponse(f"/runs/{new_id}", status_code=303)
