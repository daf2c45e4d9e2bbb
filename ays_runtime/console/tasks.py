"""Task pages: the list (search, filters, paging, bulk enable/disable), the form (create,
edit, clone) with the API's field errors beside each field, the cron helper, the task's
page (run history and chart, trigger once, enable/disable, delete with confirmation).

Every change goes through `ays_runtime.manager.tasks`, as the API's does, recorded as made
by the token via the console; a form is checked with the API's own models
(`schemas.every_error`) so each bad field shows its own message.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import Enum
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session

from ays_runtime.console import csrf
from ays_runtime.console.render import (
    PAGE_SIZE,
    PageNo,
    audit_done,
    console_actor,
    context_of,
    first,
    in_session,
    is_htmx,
    page,
    page_number,
    tasks_changed,
)
from ays_runtime.exceptions import ConflictError, ValidationError
from ays_runtime.manager import tasks
from ays_runtime.manager.schemas import (
    PAYLOAD_MODELS,
    TaskCreate,
    TriggerRequest,
    every_error,
    validated,
)
from ays_runtime.scheduler.schedule import parse_schedule
from ays_runtime.storage.models import JobLog, NodeGroup, Task
from ays_runtime.vocabulary import (
    AuditAction,
    BlockStrategy,
    MisfirePolicy,
    RetryBackoff,
    RouteStrategy,
    TaskType,
)

router = APIRouter(include_in_schema=False, dependencies=[Depends(csrf.check)])

CHOICES = {
    "task_type": [m.value for m in TaskType],
    "retry_backoff": [m.value for m in RetryBackoff],
    "route_strategy": [m.value for m in RouteStrategy],
    "block_strategy": [m.value for m in BlockStrategy],
    "misfire_policy": [m.value for m in MisfirePolicy],
    "method": ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
}
PREVIEW_FIRES = 10
HISTORY = 100


# --- the list -------------------------------------------------------------------------------


def tag_words(text: str) -> list[str]:
    """The tags a text box holds: separated by commas or spaces (lowercased, as tags are)."""
    return [word for word in re.split(r"[,\s]+", text.strip().lower()) if word]


@router.get("/tasks", response_class=HTMLResponse)
async def task_list(
    request: Request,
    q: str = "",
    group: str = "",
    status: str = "",
    tag: str = "",
    page_no: PageNo = "1",
) -> HTMLResponse:
    number = page_number(page_no)
    enabled = {"enabled": True, "disabled": False}.get(status)
    tag_error = ""

    def load(s: Session) -> tuple[list[Task], int, list[NodeGroup]]:
        nonlocal tag_error
        try:
            items, total = tasks.list_tasks(
                s,
                node_group=group or None,
                enabled=enabled,
                name=q or None,
                tags=tag_words(tag),
                limit=PAGE_SIZE,
                offset=(number - 1) * PAGE_SIZE,
            )
        except ValidationError as err:
            if err.field != "tag":
                raise
            tag_error, items, total = str(err), [], 0  # shown beside the filter
        return items, total, tasks.list_node_groups(s)

    items, total, groups = await in_session(request, load)
    context: dict[str, Any] = {
        "items": items,
        "total": total,
        "groups": groups,
        "filters": {"q": q, "group": group, "status": status, "tag": tag},
        "tag_error": tag_error,
        "page_no": number,
        "pages": max(1, -(-total // PAGE_SIZE)),
        "notice": request.query_params.get("notice", ""),
    }
    template = "tasks/_table.html" if is_htmx(request) else "tasks/list.html"
    return page(request, template, **context)


@router.post("/tasks/bulk")
async def bulk(request: Request) -> Response:
    form = await csrf.form(request)
    action = first(form, "action")
    if action not in ("enable", "disable"):
        raise ValidationError("action", action, "enable or disable")
    ids = [int(v) for v in form.get("task_id", []) if v.isdigit()]

    def change(s: Session) -> int:
        for task_id in ids:
            tasks.set_task_enabled(s, task_id, action == "enable", actor=console_actor(request))
        return len(ids)

    done = await in_session(request, change)
    await tasks_changed(request)
    back = first(form, "back", "/tasks")
    back = back if back.startswith("/tasks") else "/tasks"
    notice = f"{action}d {done} task(s)"
    sep = "&" if "?" in back else "?"
    return RedirectResponse(f"{back}{sep}notice={notice}", status_code=303)


# --- the form -------------------------------------------------------------------------------


def _blank() -> dict[str, Any]:
    """A new task's form values: the defaults of the API's own models (TaskCreate and the
    payload models), read from them so the form cannot drift from the API."""
    values: dict[str, Any] = {}
    models: list[type[BaseModel]] = [TaskCreate, *PAYLOAD_MODELS.values()]
    for model in models:
        for name, info in model.model_fields.items():
            if name == "payload":  # its fields are the payload models' own
                continue
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            values[name] = _form_value(default)
    return values


def _form_value(value: Any) -> Any:
    """A model default as the form shows it: a checkbox's bool as it is, an enum by value,
    nothing (None, an empty list or dict) as an empty field, a whole float without `.0`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, Enum):
        return str(value.value)
    if value is None or value == [] or value == {}:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _values_of(task: Task) -> dict[str, Any]:
    """A stored task as form values (env and headers one `NAME=value` line each)."""
    values = _blank()
    for name in TaskCreate.model_fields:
        if name == "tags":
            values[name] = ", ".join(task.tags)
        elif name != "payload":
            value = getattr(task, name)
            values[name] = value if isinstance(value, bool) else str(value)
    payload = task.payload or {}
    values["command"] = payload.get("command", "")
    values["workdir"] = payload.get("workdir") or ""
    values["env"] = "\n".join(f"{k}={v}" for k, v in (payload.get("env") or {}).items())
    values["url"] = payload.get("url", "")
    values["method"] = payload.get("method", "GET")
    values["headers"] = "\n".join(f"{k}: {v}" for k, v in (payload.get("headers") or {}).items())
    values["body"] = payload.get("body", "")
    status = payload.get("expected_status")
    values["expected_status"] = "" if status is None else str(status)
    return values


def _pairs(text: str, sep: str, field: str, errors: dict[str, str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, found, value = line.partition(sep)
        if not found or not name.strip():
            errors[field] = f"line {number}: write NAME{sep}value, one per line"
            return {}
        pairs[name.strip()] = value.strip() if sep == ":" else value
    return pairs


def _number(values: dict[str, Any], name: str, kind: type, errors: dict[str, str]) -> Any:
    text = str(values.get(name, "")).strip()
    try:
        return kind(text)
    except ValueError:
        errors[name] = f"{text!r} is not valid: a {'whole ' if kind is int else ''}number"
        return None


def _definition(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The task fields the form's values spell, and the errors of values that are not even
    of the right type (a number field holding letters)."""
    errors: dict[str, str] = {}
    kind = values["task_type"]
    if kind == "http":
        payload: dict[str, Any] = {
            "url": values["url"].strip(),
            "method": values["method"],
            "headers": _pairs(values["headers"], ":", "payload.headers", errors),
            "body": values["body"],
        }
        if values["expected_status"].strip():
            payload["expected_status"] = _number(values, "expected_status", int, errors)
            if "expected_status" in errors:
                errors["payload.expected_status"] = errors.pop("expected_status")
    else:
        payload = {
            "command": values["command"],
            "env": _pairs(values["env"], "=", "payload.env", errors),
        }
        if values["workdir"].strip():
            payload["workdir"] = values["workdir"].strip()
    data: dict[str, Any] = {
        "name": values["name"].strip(),
        "description": values["description"],
        "node_group": values["node_group"],
        "schedule": values["schedule"].strip(),
        "timezone": values["timezone"].strip(),
        "task_type": kind,
        "payload": payload,
        "params": values["params"],
        "timeout_s": _number(values, "timeout_s", int, errors),
        "retry_count": _number(values, "retry_count", int, errors),
        "retry_backoff": values["retry_backoff"],
        "retry_interval_s": _number(values, "retry_interval_s", float, errors),
        "route_strategy": values["route_strategy"],
        "block_strategy": values["block_strategy"],
        "misfire_policy": values["misfire_policy"],
        "enabled": bool(values["enabled"]),
        "tags": tag_words(values["tags"]),
    }
    return {k: v for k, v in data.items() if v is not None}, errors


def _form_values(form: csrf.Form) -> dict[str, Any]:
    values = _blank()
    for name in values:
        if name == "enabled":
            values[name] = first(form, "enabled") == "on"
        elif name in form:
            values[name] = first(form, name)
    return values


def check(data: dict[str, Any], errors: dict[str, str]) -> dict[str, str]:
    """Every field error the API's models find in `data` (errors already found kept)."""
    _, problems = every_error(TaskCreate, data)
    model = (
        PAYLOAD_MODELS.get(TaskType(data["task_type"]))
        if data.get("task_type") in CHOICES["task_type"]
        else None
    )
    if model is not None and isinstance(data.get("payload"), dict):
        problems += every_error(model, data["payload"], "payload")[1]
    for problem in problems:
        # One box holds every tag: a bad one's error (`tags.2`) is shown beside it.
        field = "tags" if problem.field.startswith("tags.") else problem.field
        errors.setdefault(field, str(problem))
    if "schedule" not in errors and "timezone" not in errors and data.get("schedule"):
        try:
            parse_schedule(data["schedule"], data.get("timezone") or "UTC")
        except ValidationError as err:
            errors.setdefault(err.field, str(err))
    return errors


async def _form_page(
    request: Request,
    values: dict[str, Any],
    errors: dict[str, str],
    task_id: int | None,
    status_code: int = 200,
    cloned_from: str = "",
) -> HTMLResponse:
    groups = await in_session(request, tasks.list_node_groups)
    return page(
        request,
        "tasks/form.html",
        status_code=status_code,
        values=values,
        errors=errors,
        task_id=task_id,
        groups=groups,
        choices=CHOICES,
        cloned_from=cloned_from,
        # a bad schedule's error is shown once, beside its field
        preview=_preview("" if "schedule" in errors else values["schedule"], values["timezone"]),
    )


@router.get("/tasks/new", response_class=HTMLResponse)
async def new_task(request: Request) -> HTMLResponse:
    return await _form_page(request, _blank(), {}, None)


@router.get("/tasks/{task_id:int}/edit", response_class=HTMLResponse)
async def edit_task(request: Request, task_id: int) -> HTMLResponse:
    task = await in_session(request, lambda s: tasks.get_task(s, task_id))
    return await _form_page(request, _values_of(task), {}, task_id)


@router.get("/tasks/{task_id:int}/clone", response_class=HTMLResponse)
async def clone_task(request: Request, task_id: int) -> HTMLResponse:
    task = await in_session(request, lambda s: tasks.get_task(s, task_id))
    values = _values_of(task)
    values["name"] = f"{task.name}-copy"[:128]
    return await _form_page(request, values, {}, None, cloned_from=task.name)


@router.post("/tasks/new", response_model=None)
async def create(request: Request) -> Response:
    return await _save(request, None)


@router.post("/tasks/{task_id:int}/edit", response_model=None)
async def update(request: Request, task_id: int) -> Response:
    return await _save(request, task_id)


async def _save(request: Request, task_id: int | None) -> Response:
    values = _form_values(await csrf.form(request))
    data, errors = _definition(values)
    check(data, errors)
    if not errors:
        try:
            if task_id is None:
                task = await in_session(
                    request, lambda s: tasks.create_task(s, data, actor=console_actor(request))
                )
            else:
                task = await in_session(
                    request,
                    lambda s: tasks.update_task(s, task_id, data, actor=console_actor(request)),
                )
        except ValidationError as err:
            errors[err.field] = str(err)
        except ConflictError as err:
            errors["name" if "name" in str(err) else "form"] = str(err)
        else:
            await tasks_changed(request)
            return RedirectResponse(f"/tasks/{task.id}?notice=saved", status_code=303)
    return await _form_page(request, values, errors, task_id, status_code=422)


# --- the cron helper ------------------------------------------------------------------------


def _preview(schedule: str, timezone: str) -> dict[str, Any]:
    """The next fire times of a schedule, in its time zone and in UTC, or its error."""
    schedule, timezone = schedule.strip(), (timezone.strip() or "UTC")
    if not schedule:
        return {"error": "", "fires": [], "timezone": timezone}
    try:
        parsed = parse_schedule(schedule, timezone)
    except ValidationError as err:
        return {"error": str(err), "fires": [], "timezone": timezone}
    zone = ZoneInfo(timezone)
    fires = []
    moment = datetime.now(UTC).replace(tzinfo=None)
    for _ in range(PREVIEW_FIRES):
        moment = parsed.next_after(moment)
        local = moment.replace(tzinfo=UTC).astimezone(zone)
        fires.append({"local": local.strftime("%Y-%m-%d %H:%M:%S %Z"), "utc": moment})
    return {"error": "", "fires": fires, "timezone": timezone}


@router.get("/tasks/cron-preview", response_class=HTMLResponse)
async def cron_preview(request: Request, schedule: str = "", timezone: str = "UTC") -> HTMLResponse:
    """The fragment under the schedule field: the next 10 fires (an htmx request per key)."""
    return page(request, "tasks/_cron.html", preview=_preview(schedule[:255], timezone[:64]))


# --- one task -------------------------------------------------------------------------------


@router.get("/tasks/{task_id:int}", response_class=HTMLResponse)
async def task_page(request: Request, task_id: int, page_no: PageNo = "1") -> HTMLResponse:
    number = page_number(page_no)

    def load(s: Session) -> tuple[Task, list[JobLog], int, list[JobLog]]:
        task = tasks.get_task(s, task_id)
        # The chart's last runs and the history's first page are one query on page 1.
        recent, total = tasks.list_job_logs(s, task_id=task_id, limit=HISTORY)
        if number == 1:
            return task, recent[:PAGE_SIZE], total, recent
        runs, total = tasks.list_job_logs(
            s, task_id=task_id, limit=PAGE_SIZE, offset=(number - 1) * PAGE_SIZE
        )
        return task, runs, total, recent

    task, runs, total, recent = await in_session(request, load)
    finished = [r for r in reversed(recent) if r.started_at is not None and r.ended_at is not None]
    durations = [(r.ended_at - r.started_at).total_seconds() for r in finished]  # type: ignore[operator]
    chart = {
        "x": [int(r.started_at.replace(tzinfo=UTC).timestamp()) for r in finished],  # type: ignore[union-attr]
        "y": "seconds",
        "series": [
            {"label": "duration (s)", "values": durations},
            {
                "label": "failed",
                "values": [
                    None if r.status == "succeeded" else d
                    for r, d in zip(finished, durations, strict=True)
                ],
                "points": True,
            },
        ],
    }
    succeeded = sum(1 for r in finished if r.status == "succeeded")
    return page(
        request,
        "tasks/detail.html",
        task=task,
        runs=runs,
        total=total,
        page_no=number,
        pages=max(1, -(-total // PAGE_SIZE)),
        chart=chart,
        finished=len(finished),
        success_rate=(100.0 * succeeded / len(finished)) if finished else None,
        preview=_preview(task.schedule, task.timezone),
        notice=request.query_params.get("notice", ""),
    )


@router.post("/tasks/{task_id:int}/enable")
async def enable(request: Request, task_id: int) -> Response:
    return await _set_enabled(request, task_id, True)


@router.post("/tasks/{task_id:int}/disable")
async def disable(request: Request, task_id: int) -> Response:
    return await _set_enabled(request, task_id, False)


async def _set_enabled(request: Request, task_id: int, enabled: bool) -> Response:
    await in_session(
        request, lambda s: tasks.set_task_enabled(s, task_id, enabled, actor=console_actor(request))
    )
    await tasks_changed(request)
    word = "enabled" if enabled else "disabled"
    return RedirectResponse(f"/tasks/{task_id}?notice={word}", status_code=303)


@router.post("/tasks/{task_id:int}/trigger")
async def trigger(request: Request, task_id: int) -> Response:
    """Fire once now; `params_override` (when `override` is ticked) replaces the params."""
    form = await csrf.form(request)
    params: str | None = first(form, "params") if first(form, "override") == "on" else None
    if params is not None:
        validated(TriggerRequest, {"params": params})  # the API's own bounds
    task = await in_session(request, lambda s: tasks.get_task(s, task_id))
    job_log_id = await context_of(request).trigger_now(task_id, params)
    fired = {"job_log_id": job_log_id, "params": params}
    await audit_done(request, AuditAction.TASK_TRIGGERED, task.name, fired)
    return RedirectResponse(f"/runs/{job_log_id}", status_code=303)


@router.get("/tasks/{task_id:int}/delete", response_class=HTMLResponse)
async def confirm_delete(request: Request, task_id: int) -> HTMLResponse:
    task = await in_session(request, lambda s: tasks.get_task(s, task_id))
    return page(request, "tasks/delete.html", task=task)


@router.post("/tasks/{task_id:int}/delete")
async def delete(request: Request, task_id: int) -> Response:
    task = await in_session(request, lambda s: tasks.get_task(s, task_id))
    name = task.name
    await in_session(request, lambda s: tasks.delete_task(s, task_id, actor=console_actor(request)))
    await tasks_changed(request)
    return RedirectResponse(f"/tasks?notice=deleted {name}", status_code=303)
