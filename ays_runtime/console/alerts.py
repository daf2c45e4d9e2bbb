"""The alerts page: the rules and channels in force (the env file's read-only, with their
source), what is open, the latest deliveries; creating, editing and deleting a rule or a
channel made through the console or the API (errors shown at their field), silencing a rule,
and a test notice through a channel (htmx swaps its outcome in place).

Changes go through `ays_runtime.alerts.policies`, as the API's routes do (the same checks,
the same audit entries, via `console`), then the manager's alert service runs with them at
once (`AlertService.reload`). A channel's secret is never shown: its field is left empty,
and an empty field on an edit keeps the secret.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ays_runtime.alerts import outbox, policies
from ays_runtime.alerts.service import AlertService
from ays_runtime.console import csrf
from ays_runtime.console.render import console_actor, first, in_session, is_htmx, page
from ays_runtime.exceptions import (
    ConflictError,
    InvalidDocument,
    NotFoundError,
    ValidationError,
)
from ays_runtime.storage.database import utcnow

router = APIRouter(include_in_schema=False, dependencies=[Depends(csrf.check)])

WHEN = [
    "run_failed",
    "consecutive_failures",
    "started_late",
    "running_longer_than",
    "node_offline",
    "group_unhealthy",
    "slot_missed",
]
FORMATS = ["ays", "slack", "dingtalk", "wecom", "feishu"]
RECENT = 20  # deliveries shown
SILENCE_CHOICES = [(30, "30 minutes"), (60, "1 hour"), (240, "4 hours"), (1440, "1 day")]


def _service(request: Request) -> AlertService:
    service: AlertService | None = getattr(request.app.state, "alerts", None)
    if service is None:
        raise NotFoundError("alerts are not served by this manager")
    return service


def _words(text: str) -> list[str]:
    return [w for w in (part.strip() for part in text.replace("\n", ",").split(",")) if w]


def _errors(err: ValidationError) -> dict[str, str]:
    """Field -> message, the field as the form names it (a list's item: the list)."""
    found = err.errors if isinstance(err, InvalidDocument) else [err]
    errors: dict[str, str] = {}
    for e in found:
        errors.setdefault(e.field.split(".")[0], str(e))
    return errors


async def _alerts_page(
    request: Request, status_code: int = 200, error: str = "", notice: str = ""
) -> HTMLResponse:
    service = _service(request)
    now = utcnow()

    def load(s: Session) -> dict[str, Any]:
        described = policies.describe(s, service.env_settings, now)
        described["silences"] = policies.silences(s, None, now)
        return described

    described = await in_session(request, load)
    recent = await run_in_threadpool(outbox.recent, service.engine, None, RECENT)
    since = now - timedelta(hours=24)
    opened = await run_in_threadpool(outbox.open_alerts, service.engine, since)
    return page(
        request,
        "alerts/list.html",
        status_code=status_code,
        rules=described["rules"],
        channels=described["channels"],
        silences=described["silences"],
        deliveries=recent,
        opened=opened,
        silence_choices=SILENCE_CHOICES,
        error=error,
        notice=notice or request.query_params.get("notice", ""),
    )


@router.get("/alerts", response_class=HTMLResponse)
async def alerts_page(request: Request) -> HTMLResponse:
    return await _alerts_page(request)


# --- rules ------------------------------------------------------------------------------------


def _rule_form(form: csrf.Form) -> dict[str, Any]:
    values: dict[str, Any] = {
        k: first(form, k).strip()
        for k in ("name", "when", "tasks", "node_groups", "count", "seconds", "factor", "history")
    }
    values["channels"] = form.get("channels", [])
    values["recovery"] = first(form, "recovery") == "on"
    return values


def _rule_data(values: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": values["name"],
        "when": values["when"],
        "channels": values["channels"],
        "tasks": _words(values["tasks"]),
        "node_groups": _words(values["node_groups"]),
        "recovery": values["recovery"],
    }
    for number in ("count", "seconds", "factor", "history"):
        if values[number]:
            data[number] = values[number]  # checked (and converted) by the rule's model
    return data


def _rule_values(rule: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": rule["name"],
        "when": rule["when"],
        "channels": rule["channels"],
        "tasks": ", ".join(rule["tasks"]),
        "node_groups": ", ".join(rule["node_groups"]),
        "count": str(rule["count"]),
        "seconds": f"{rule['seconds']:g}",
        "factor": f"{rule['factor']:g}" if rule.get("factor") else "",
        "history": str(rule["history"]),
        "recovery": rule["recovery"],
    }


async def _rule_page(
    request: Request,
    values: dict[str, Any],
    editing: str | None,
    errors: dict[str, str] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    service = _service(request)
    described = await in_session(
        request, lambda s: policies.describe(s, service.env_settings, utcnow())
    )
    return page(
        request,
        "alerts/rule_form.html",
        status_code=status_code,
        values=values,
        editing=editing,
        errors=errors or {},
        whens=WHEN,
        channel_names=[c["name"] for c in described["channels"]],
    )


@router.get("/alerts/rules/new", response_class=HTMLResponse)
async def new_rule(request: Request) -> HTMLResponse:
    blank = {
        "name": "",
        "when": "run_failed",
        "channels": [],
        "tasks": "",
        "node_groups": "",
        "count": "",
        "seconds": "",
        "factor": "",
        "history": "",
        "recovery": True,
    }
    return await _rule_page(request, blank, None)


@router.get("/alerts/rules/{name}/edit", response_class=HTMLResponse)
async def edit_rule(request: Request, name: str) -> HTMLResponse:
    service = _service(request)
    described = await in_session(
        request, lambda s: policies.describe(s, service.env_settings, utcnow())
    )
    rule = next((r for r in described["rules"] if r["name"] == name), None)
    if rule is None:
        raise NotFoundError(f"no alert rule named {name}")
    if rule["read_only"]:
        raise ConflictError(f"rule {name} is defined in the env file: change it there")
    return await _rule_page(request, _rule_values(rule), name)


@router.post("/alerts/rules", response_model=None)
async def create_rule(request: Request) -> Response:
    return await _save_rule(request, None)


@router.post("/alerts/rules/{name}", response_model=None)
async def update_rule(request: Request, name: str) -> Response:
    return await _save_rule(request, name)


async def _save_rule(request: Request, name: str | None) -> Response:
    service = _service(request)
    values = _rule_form(await csrf.form(request))
    data, actor, env = _rule_data(values), console_actor(request), service.env_settings
    if name is not None:
        values["name"] = name
        data.pop("name")
    try:
        if name is None:
            await in_session(request, lambda s: policies.create_rule(s, env, data, actor))
        else:
            await in_session(request, lambda s: policies.update_rule(s, env, name, data, actor))
    except ValidationError as err:
        return await _rule_page(request, values, name, _errors(err), 422)
    except ConflictError as err:
        return await _rule_page(request, values, name, {"name": str(err)}, 409)
    await service.reload()
    done = "created" if name is None else "saved"
    return RedirectResponse(f"/alerts?notice={done} rule {values['name']}", status_code=303)


@router.post("/alerts/rules/{name}/delete", response_model=None)
async def delete_rule(request: Request, name: str) -> Response:
    service, actor = _service(request), console_actor(request)
    try:
        await in_session(
            request, lambda s: policies.delete_rule(s, service.env_settings, name, actor)
        )
    except ConflictError as err:
        return await _alerts_page(request, 409, error=str(err))
    await service.reload()
    return RedirectResponse(f"/alerts?notice=deleted rule {name}", status_code=303)


@router.post("/alerts/rules/{name}/silence", response_model=None)
async def silence_rule(request: Request, name: str) -> Response:
    service, actor = _service(request), console_actor(request)
    minutes = first(await csrf.form(request), "minutes", "60")
    if not minutes.isdigit() or not 0 < int(minutes) <= 366 * 1440:
        return await _alerts_page(request, 422, error=f"minutes: {minutes!r} is not a duration")
    start = utcnow()
    end = start + timedelta(minutes=int(minutes))
    await in_session(
        request, lambda s: policies.silence(s, service.env_settings, name, start, end, actor)
    )
    await service.reload()
    return RedirectResponse(f"/alerts?notice=silenced rule {name}", status_code=303)


@router.post("/alerts/rules/{name}/unsilence", response_model=None)
async def unsilence_rule(request: Request, name: str) -> Response:
    service, actor = _service(request), console_actor(request)
    await in_session(request, lambda s: policies.unsilence(s, service.env_settings, name, actor))
    await service.reload()
    return RedirectResponse(f"/alerts?notice=rule {name} speaks again", status_code=303)


# --- channels ---------------------------------------------------------------------------------

CHANNEL_FIELDS = (
    "name",
    "type",
    "url",
    "format",
    "secret",
    "host",
    "port",
    "username",
    "password",
    "sender",
    "to",
)


def _channel_form(form: csrf.Form) -> dict[str, Any]:
    values: dict[str, Any] = {k: first(form, k).strip() for k in CHANNEL_FIELDS}
    values["starttls"] = first(form, "starttls") == "on"
    return values


def _channel_data(values: dict[str, Any]) -> dict[str, Any]:
    """The channel's fields from the form: only its type's, blanks left out (a blank secret
    on an edit keeps the stored one)."""
    if values["type"] == "email":
        data: dict[str, Any] = {
            k: values[k] for k in ("host", "port", "username", "password", "sender") if values[k]
        }
        data |= {"to": _words(values["to"]), "starttls": values["starttls"]}
    else:
        data = {k: values[k] for k in ("url", "format", "secret") if values[k]}
    return {"name": values["name"], "type": values["type"], **data}


async def _channel_page(
    request: Request,
    values: dict[str, Any],
    editing: str | None,
    errors: dict[str, str] | None = None,
    status_code: int = 200,
    secret_set: bool = False,
) -> HTMLResponse:
    shown = values | {"secret": "", "password": ""}  # a secret is never sent back
    return page(
        request,
        "alerts/channel_form.html",
        status_code=status_code,
        values=shown,
        editing=editing,
        errors=errors or {},
        formats=FORMATS,
        secret_set=secret_set,
    )


@router.get("/alerts/channels/new", response_class=HTMLResponse)
async def new_channel(request: Request) -> HTMLResponse:
    blank = {k: "" for k in CHANNEL_FIELDS} | {"type": "webhook", "format": "ays"}
    return await _channel_page(request, blank | {"port": "587", "starttls": True}, None)


@router.get("/alerts/channels/{name}/edit", response_class=HTMLResponse)
async def edit_channel(request: Request, name: str) -> HTMLResponse:
    service = _service(request)
    described = await in_session(
        request, lambda s: policies.describe(s, service.env_settings, utcnow())
    )
    channel = next((c for c in described["channels"] if c["name"] == name), None)
    if channel is None:
        raise NotFoundError(f"no alert channel named {name}")
    if channel["read_only"]:
        raise ConflictError(f"channel {name} is defined in the env file: change it there")
    values = {k: "" for k in CHANNEL_FIELDS} | {
        k: str(v) if v is not None else ""
        for k, v in channel.items()
        if k in CHANNEL_FIELDS and k != "to"
    }
    values |= {"to": ", ".join(channel.get("to", [])), "starttls": channel.get("starttls", True)}
    secret_set = bool(channel.get("secret_set") or channel.get("password_set"))
    return await _channel_page(request, values, name, secret_set=secret_set)


@router.post("/alerts/channels", response_model=None)
async def create_channel(request: Request) -> Response:
    return await _save_channel(request, None)


@router.post("/alerts/channels/{name}", response_model=None)
async def update_channel(request: Request, name: str) -> Response:
    return await _save_channel(request, name)


async def _save_channel(request: Request, name: str | None) -> Response:
    service = _service(request)
    values = _channel_form(await csrf.form(request))
    data, actor, env = _channel_data(values), console_actor(request), service.env_settings
    if name is not None:
        values["name"] = name
        data.pop("name")
    try:
        if name is None:
            await in_session(request, lambda s: policies.create_channel(s, env, data, actor))
        else:
            await in_session(request, lambda s: policies.update_channel(s, env, name, data, actor))
    except ValidationError as err:
        return await _channel_page(request, values, name, _errors(err), 422)
    except ConflictError as err:
        return await _channel_page(request, values, name, {"name": str(err)}, 409)
    await service.reload()
    done = "created" if name is None else "saved"
    return RedirectResponse(f"/alerts?notice={done} channel {values['name']}", status_code=303)


@router.post("/alerts/channels/{name}/delete", response_model=None)
async def delete_channel(request: Request, name: str) -> Response:
    service, actor = _service(request), console_actor(request)
    try:
        await in_session(
            request, lambda s: policies.delete_channel(s, service.env_settings, name, actor)
        )
    except ConflictError as err:
        return await _alerts_page(request, 409, error=str(err))
    await service.reload()
    return RedirectResponse(f"/alerts?notice=deleted channel {name}", status_code=303)


@router.post("/alerts/channels/{name}/test", response_model=None)
async def test_channel(request: Request, name: str) -> Response:
    """Queue a test notice; htmx swaps the outcome next to the button."""
    try:
        delivery = await _service(request).test(name)
        said = f"test notice {delivery} queued: see the deliveries below (reload)"
    except ValidationError as err:
        said = str(err)
    if is_htmx(request):
        return page(request, "alerts/_tested.html", said=said)
    return RedirectResponse(f"/alerts?notice={said}", status_code=303)
