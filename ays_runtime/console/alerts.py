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

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ays_runtime.alerts import outbox, policies
from ays_runtime.alerts.service import AlertService
from ays_runtime.alerts.settings import AlertSettings
from ays_runtime.console import csrf
from ays_runtime.console.render import console_actor, first, in_session, is_htmx, page
from ays_runtime.exceptions import (
    ConflictError,
    InvalidDocument,
    NotFoundError,
    ValidationError,
)
from ays_runtime.manager.versions import Actor
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


async def _described(request: Request) -> dict[str, Any]:
    service = _service(request)
    return await in_session(request, lambda s: policies.describe(s, service.env_settings, utcnow()))


# --- a rule or a channel: one form flow -------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """What a rule's and a channel's forms differ in. The flow is one (`_new`, `_edit`,
    `_save`, `_delete`): the form, checked and saved through `policies` (an error shown at
    its field, the form sent back as typed), deleted; each change reloads the alert service.
    The routes stay one per URL: /alerts/<noun>s, /alerts/<noun>s/{name}[/edit|/delete]."""

    noun: str  # "rule" or "channel": its URLs, its template alerts/<noun>_form.html, notices
    listed: str  # its list in policies.describe
    blank: dict[str, Any]  # a new one's form
    read: Callable[[csrf.Form], dict[str, Any]]  # the posted form -> its values as typed
    data: Callable[[dict[str, Any]], dict[str, Any]]  # the values -> what policies checks
    values: Callable[[dict[str, Any]], dict[str, Any]]  # one described -> its form
    # What else its template shows: (described, the one edited or None) -> context
    context: Callable[[dict[str, Any], dict[str, Any] | None], dict[str, Any]]
    create: Callable[[Session, AlertSettings, dict[str, Any], Actor], object]
    update: Callable[[Session, AlertSettings, str, dict[str, Any], Actor], object]
    delete: Callable[[Session, AlertSettings, str, Actor], None]
    secrets: tuple[str, ...] = ()  # fields never sent back: always shown empty


def _one(described: dict[str, Any], kind: Kind, name: str | None) -> dict[str, Any] | None:
    return next((x for x in described[kind.listed] if x["name"] == name), None)


async def _form_page(
    request: Request,
    kind: Kind,
    values: dict[str, Any],
    editing: str | None,
    errors: dict[str, str] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    described = await _described(request)
    return page(
        request,
        f"alerts/{kind.noun}_form.html",
        status_code=status_code,
        values=values | dict.fromkeys(kind.secrets, ""),
        editing=editing,
        errors=errors or {},
        **kind.context(described, _one(described, kind, editing)),
    )


async def _new(request: Request, kind: Kind) -> HTMLResponse:
    return await _form_page(request, kind, dict(kind.blank), None)


async def _edit(request: Request, kind: Kind, name: str) -> HTMLResponse:
    described = await _described(request)
    found = _one(described, kind, name)
    if found is None:
        raise NotFoundError(f"no alert {kind.noun} named {name}")
    if found["read_only"]:
        raise ConflictError(f"{kind.noun} {name} is defined in the env file: change it there")
    return await _form_page(request, kind, kind.values(found), name)


async def _save(request: Request, kind: Kind, name: str | None) -> Response:
    """Create (`name` None) or update the one named `name` from the posted form."""
    service = _service(request)
    values = kind.read(await csrf.form(request))
    data, actor, env = kind.data(values), console_actor(request), service.env_settings
    if name is not None:
        values["name"] = name
        data.pop("name")
    try:
        if name is None:
            await in_session(request, lambda s: kind.create(s, env, data, actor))
        else:
            await in_session(request, lambda s: kind.update(s, env, name, data, actor))
    except ValidationError as err:
        return await _form_page(request, kind, values, name, _errors(err), 422)
    except ConflictError as err:
        return await _form_page(request, kind, values, name, {"name": str(err)}, 409)
    await service.reload()
    done = "created" if name is None else "saved"
    return RedirectResponse(f"/alerts?notice={done} {kind.noun} {values['name']}", status_code=303)


async def _delete(request: Request, kind: Kind, name: str) -> Response:
    service, actor = _service(request), console_actor(request)
    try:
        await in_session(request, lambda s: kind.delete(s, service.env_settings, name, actor))
    except ConflictError as err:
        return await _alerts_page(request, 409, error=str(err))
    await service.reload()
    return RedirectResponse(f"/alerts?notice=deleted {kind.noun} {name}", status_code=303)


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


RULE = Kind(
    noun="rule",
    listed="rules",
    blank={
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
    },
    read=_rule_form,
    data=_rule_data,
    values=_rule_values,
    context=lambda described, _rule: {
        "whens": WHEN,
        "channel_names": [c["name"] for c in described["channels"]],
    },
    create=policies.create_rule,
    update=policies.update_rule,
    delete=policies.delete_rule,
)


@router.get("/alerts/rules/new", response_class=HTMLResponse)
async def new_rule(request: Request) -> HTMLResponse:
    return await _new(request, RULE)


@router.get("/alerts/rules/{name}/edit", response_class=HTMLResponse)
async def edit_rule(request: Request, name: str) -> HTMLResponse:
    return await _edit(request, RULE, name)


@router.post("/alerts/rules", response_model=None)
async def create_rule(request: Request) -> Response:
    return await _save(request, RULE, None)


@router.post("/alerts/rules/{name}", response_model=None)
async def update_rule(request: Request, name: str) -> Response:
    return await _save(request, RULE, name)


@router.post("/alerts/rules/{name}/delete", response_model=None)
async def delete_rule(request: Request, name: str) -> Response:
    return await _delete(request, RULE, name)


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


def _channel_values(channel: dict[str, Any]) -> dict[str, Any]:
    values = {k: "" for k in CHANNEL_FIELDS} | {
        k: str(v) if v is not None else ""
        for k, v in channel.items()
        if k in CHANNEL_FIELDS and k != "to"
    }
    return values | {
        "to": ", ".join(channel.get("to", [])),
        "starttls": channel.get("starttls", True),
    }


def _channel_context(_described: dict[str, Any], channel: dict[str, Any] | None) -> dict[str, Any]:
    secret_set = channel is not None and bool(
        channel.get("secret_set") or channel.get("password_set")
    )
    return {"formats": FORMATS, "secret_set": secret_set}


CHANNEL = Kind(
    noun="channel",
    listed="channels",
    blank={k: "" for k in CHANNEL_FIELDS}
    | {"type": "webhook", "format": "ays", "port": "587", "starttls": True},
    read=_channel_form,
    data=_channel_data,
    values=_channel_values,
    context=_channel_context,
    create=policies.create_channel,
    update=policies.update_channel,
    delete=policies.delete_channel,
    secrets=("secret", "password"),  # a secret is never sent back
)


@router.get("/alerts/channels/new", response_class=HTMLResponse)
async def new_channel(request: Request) -> HTMLResponse:
    return await _new(request, CHANNEL)


@router.get("/alerts/channels/{name}/edit", response_class=HTMLResponse)
async def edit_channel(request: Request, name: str) -> HTMLResponse:
    return await _edit(request, CHANNEL, name)


@router.post("/alerts/channels", response_model=None)
async def create_channel(request: Request) -> Response:
    return await _save(request, CHANNEL, None)


@router.post("/alerts/channels/{name}", response_model=None)
async def update_channel(request: Request, name: str) -> Response:
    return await _save(request, CHANNEL, name)


@router.post("/alerts/channels/{name}/delete", response_model=None)
async def delete_channel(request: Request, name: str) -> Response:
    return await _delete(request, CHANNEL, name)


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
