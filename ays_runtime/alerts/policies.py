"""Alert channels and rules made through the API (the console and the CLI call it), merged
with the env file's.

- The env file's channels and rules stay as they are (source `env`, read-only here: changed
  by editing the env file). Those made through the API are rows of `ays_alert_channel` and
  `ays_alert_rule` (source `api`). A name is unique across both; a stored rule may notify an
  env-file channel, and the reverse.
- Secrets are write-only: a webhook's `secret` and an email channel's `password` are kept in
  the row's `secret` column, never in what this module returns (it says `secret_set` /
  `password_set`) nor in the audit trail. Updating a channel without the field keeps the
  secret; `null` clears it.
- Silence windows (`ays_alert_silence`) can be set on any rule, the env file's too.
- Every change adds an audit entry (`ays_runtime.audit.trail`) in its own transaction, the
  definition before and after (secrets left out).
- `settings(session, env, now)` is what the alert service runs with: the env file's section
  with the stored channels, rules and silences added. A stored rule that names a channel
  that no longer exists (the env file dropped it) is left out, and listed as `broken`.

Bad input raises `ValidationError`/`InvalidDocument` naming the field (422), a name taken or
an env-file item changed raises `ConflictError` (409), an unknown name `NotFoundError` (404).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from ays_runtime.alerts.settings import AlertRule, AlertSettings, Channel, Silence
from ays_runtime.audit import trail
from ays_runtime.exceptions import ConflictError, InvalidDocument, NotFoundError, ValidationError
from ays_runtime.manager.schemas import field_error
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import AlertChannelRow, AlertRuleRow, AlertSilence
from ays_runtime.vocabulary import AuditAction

if TYPE_CHECKING:
    from ays_runtime.manager.versions import Actor

log = logging.getLogger("ays.alerts")
ENV, API = "env", "api"
SECRET_FIELD = {"webhook": "secret", "email": "password"}
_CHANNEL = TypeAdapter(Channel)


# --- reading ----------------------------------------------------------------------------------


def settings(session: Session, env: AlertSettings, now: datetime) -> AlertSettings:
    """The env file's alerts section with the stored channels, rules and silences."""
    merged, _ = _merge(session, env, now)
    return merged


def describe(session: Session, env: AlertSettings, now: datetime) -> dict[str, Any]:
    """Every channel and rule in force, as the API shows them (no secret)."""
    merged, broken = _merge(session, env, now)
    api_channels = set(session.scalars(select(AlertChannelRow.name)))
    api_rules = set(session.scalars(select(AlertRuleRow.name)))
    moment = now.replace(tzinfo=UTC)
    rules = [
        public_rule(r, API if r.name in api_rules else ENV, r.silenced(moment))
        for r in merged.rules
    ]
    rules += [public_rule(r, API, False) | {"broken": why} for r, why in broken]
    return {
        "channels": [
            public_channel(c, API if c.name in api_channels else ENV) for c in merged.channels
        ],
        "rules": rules,
    }


def public_channel(channel: Any, source: str) -> dict[str, Any]:
    secret = SECRET_FIELD[channel.type]
    shown = channel.model_dump(mode="json", exclude={secret})
    return shown | {
        f"{secret}_set": getattr(channel, secret) is not None,
        "source": source,
        "read_only": source == ENV,
    }


def public_rule(rule: AlertRule, source: str, silenced: bool) -> dict[str, Any]:
    return rule.model_dump(mode="json") | {
        "silenced": silenced,
        "source": source,
        "read_only": source == ENV,
    }


def _merge(
    session: Session, env: AlertSettings, now: datetime
) -> tuple[AlertSettings, list[tuple[AlertRule, str]]]:
    env_channels = {c.name for c in env.channels}
    env_rules = {r.name for r in env.rules}
    channels = list(env.channels)
    for row in session.scalars(select(AlertChannelRow).order_by(AlertChannelRow.id)):
        if row.name in env_channels:  # the env file wins a name it took later
            continue
        try:
            channels.append(_stored_channel(row))
        except PydanticValidationError as err:  # stored by another version of Ays
            log.warning("alerts: stored channel %s is left out: %s", row.name, err.title)
    names = {c.name for c in channels}
    rules, broken = list(env.rules), []
    for stored in session.scalars(select(AlertRuleRow).order_by(AlertRuleRow.id)):
        if stored.name in env_rules:
            continue
        try:
            rule = AlertRule.model_validate(stored.definition)
        except PydanticValidationError as err:  # stored by another version of Ays
            log.warning("alerts: stored rule %s is left out: %s", stored.name, err)
            continue
        missing = [c for c in rule.channels if c not in names]
        if missing:
            broken.append((rule, f"no channel named {', '.join(missing)}"))
        else:
            rules.append(rule)
    windows: dict[str, list[Silence]] = {}
    for s in session.scalars(select(AlertSilence).where(AlertSilence.end_at > now)):
        windows.setdefault(s.rule, []).append(Silence(start=s.start_at, end=s.end_at))
    rules = [
        r.model_copy(update={"silences": [*r.silences, *windows[r.name]]})
        if r.name in windows
        else r
        for r in rules
    ]
    return env.model_copy(update={"channels": channels, "rules": rules}), broken


def _stored_channel(row: AlertChannelRow) -> Any:
    data = dict(row.definition)
    if row.secret is not None:
        data[SECRET_FIELD[row.type]] = row.secret
    return _CHANNEL.validate_python(data)


def silences(session: Session, rule: str | None, now: datetime) -> list[dict[str, Any]]:
    """The silence windows set through the API that have not ended, soonest end first."""
    query = select(AlertSilence).where(AlertSilence.end_at > now).order_by(AlertSilence.end_at)
    if rule is not None:
        query = query.where(AlertSilence.rule == rule)
    return [
        {
            "id": s.id,
            "rule": s.rule,
            "start": s.start_at.replace(tzinfo=UTC),
            "end": s.end_at.replace(tzinfo=UTC),
            "who": s.who,
        }
        for s in session.scalars(query)
    ]


# --- checking ---------------------------------------------------------------------------------


def check_channel(data: Any) -> Any:
    """`data` as a channel, or InvalidDocument naming every bad field."""
    try:
        return _CHANNEL.validate_python(data)
    except PydanticValidationError as err:
        errors = []
        for detail in err.errors():
            loc = detail["loc"]
            if detail["type"] in ("union_tag_not_found", "union_tag_invalid"):
                detail = {**detail, "loc": ("type",)}
            elif loc and loc[0] in SECRET_FIELD:
                detail = {**detail, "loc": loc[1:]}  # the union's tag is not a field
            errors.append(_hide_secret(field_error(detail)))
        raise InvalidDocument(errors) from None


def _hide_secret(error: ValidationError) -> ValidationError:
    if error.field in SECRET_FIELD.values():
        return ValidationError(error.field, "(hidden)", error.expected)
    return error


def check_rule(data: Any, channels: set[str]) -> AlertRule:
    try:
        rule = AlertRule.model_validate(data)
    except PydanticValidationError as err:
        raise InvalidDocument([field_error(d) for d in err.errors()]) from None
    missing = [c for c in rule.channels if c not in channels]
    if missing:
        raise ValidationError(
            "channels",
            missing,
            f"names of channels; known: {', '.join(sorted(channels)) or 'none yet'}",
        )
    return rule


def _is_env(kind: str, name: str, env_names: set[str]) -> None:
    if name in env_names:
        raise ConflictError(
            f"{kind} {name} is defined in the env file (source env): change it there"
        )


# --- changing ---------------------------------------------------------------------------------


def create_channel(
    session: Session, env: AlertSettings, data: dict[str, Any], actor: Actor
) -> dict[str, Any]:
    channel = check_channel(data)
    _is_env("channel", channel.name, {c.name for c in env.channels})
    if session.scalar(select(AlertChannelRow.id).where(AlertChannelRow.name == channel.name)):
        raise ConflictError(f"a channel named {channel.name} exists; choose another name")
    secret = getattr(channel, SECRET_FIELD[channel.type])
    row = AlertChannelRow(
        name=channel.name,
        type=channel.type,
        definition=channel.model_dump(mode="json", exclude={SECRET_FIELD[channel.type]}),
        secret=secret.get_secret_value() if secret is not None else None,
        updated_at=utcnow(),
    )
    session.add(row)
    shown = public_channel(channel, API)
    trail.record(session, actor, AuditAction.ALERT_CHANNEL_CREATED, channel.name, after=shown)
    session.commit()
    return shown


def update_channel(
    session: Session, env: AlertSettings, name: str, data: dict[str, Any], actor: Actor
) -> dict[str, Any]:
    """Replace the channel's settings; without its secret field the secret is kept."""
    _is_env("channel", name, {c.name for c in env.channels})
    row = _channel_row(session, name)
    data = {"name": name, "type": row.type, **data}
    if data["name"] != name:
        raise ValidationError("name", data["name"], f"{name}: a channel is not renamed")
    secret_field = SECRET_FIELD.get(str(data.get("type")), "")
    if secret_field and secret_field not in data and row.secret is not None:
        data[secret_field] = row.secret
    before = public_channel(_stored_channel(row), API)
    channel = check_channel(data)
    secret = getattr(channel, SECRET_FIELD[channel.type])
    row.type = channel.type
    row.definition = channel.model_dump(mode="json", exclude={SECRET_FIELD[channel.type]})
    row.secret = secret.get_secret_value() if secret is not None else None
    row.updated_at = utcnow()
    shown = public_channel(channel, API)
    trail.record(
        session, actor, AuditAction.ALERT_CHANNEL_UPDATED, name, before=before, after=shown
    )
    session.commit()
    return shown


def delete_channel(session: Session, env: AlertSettings, name: str, actor: Actor) -> None:
    """Refused (409) while a rule notifies the channel."""
    _is_env("channel", name, {c.name for c in env.channels})
    row = _channel_row(session, name)
    users = [r.name for r in env.rules if name in r.channels] + [
        r.name
        for r in session.scalars(select(AlertRuleRow))
        if name in r.definition.get("channels", [])
    ]
    if users:
        raise ConflictError(
            f"channel {name} is used by rule(s) {', '.join(users)}: change or delete them first"
        )
    before = public_channel(_stored_channel(row), API)
    session.delete(row)
    trail.record(session, actor, AuditAction.ALERT_CHANNEL_DELETED, name, before=before)
    session.commit()


def create_rule(
    session: Session, env: AlertSettings, data: dict[str, Any], actor: Actor
) -> dict[str, Any]:
    rule = check_rule(data, _channel_names(session, env))
    _is_env("rule", rule.name, {r.name for r in env.rules})
    if session.scalar(select(AlertRuleRow.id).where(AlertRuleRow.name == rule.name)):
        raise ConflictError(f"a rule named {rule.name} exists; choose another name")
    session.add(
        AlertRuleRow(name=rule.name, definition=rule.model_dump(mode="json"), updated_at=utcnow())
    )
    shown = public_rule(rule, API, False)
    trail.record(session, actor, AuditAction.ALERT_RULE_CREATED, rule.name, after=shown)
    session.commit()
    return shown


def update_rule(
    session: Session, env: AlertSettings, name: str, data: dict[str, Any], actor: Actor
) -> dict[str, Any]:
    """Replace the rule's settings (its name stays)."""
    _is_env("rule", name, {r.name for r in env.rules})
    row = _rule_row(session, name)
    data = {"name": name, **data}
    if data["name"] != name:
        raise ValidationError("name", data["name"], f"{name}: a rule is not renamed")
    rule = check_rule(data, _channel_names(session, env))
    before = public_rule(AlertRule.model_validate(row.definition), API, False)
    row.definition = rule.model_dump(mode="json")
    row.updated_at = utcnow()
    shown = public_rule(rule, API, False)
    trail.record(session, actor, AuditAction.ALERT_RULE_UPDATED, name, before=before, after=shown)
    session.commit()
    return shown


def delete_rule(session: Session, env: AlertSettings, name: str, actor: Actor) -> None:
    _is_env("rule", name, {r.name for r in env.rules})
    row = _rule_row(session, name)
    before = public_rule(AlertRule.model_validate(row.definition), API, False)
    session.delete(row)
    session.execute(delete(AlertSilence).where(AlertSilence.rule == name))
    trail.record(session, actor, AuditAction.ALERT_RULE_DELETED, name, before=before)
    session.commit()


def silence(
    session: Session,
    env: AlertSettings,
    name: str,
    start: datetime,
    end: datetime,
    actor: Actor,
) -> dict[str, Any]:
    """Silence rule `name` (the env file's or a stored one) from `start` to `end` (naive UTC)."""
    if name not in {r.name for r in env.rules}:
        _rule_row(session, name)
    if end <= start:
        raise ValidationError("end", end.isoformat(), f"a time after the start ({start})")
    if end <= utcnow():
        raise ValidationError("end", end.isoformat(), "a time in the future")
    row = AlertSilence(
        rule=name, start_at=start, end_at=end, who=actor.who[:128], created_at=utcnow()
    )
    session.add(row)
    what = {"start": _iso(start), "end": _iso(end)}
    trail.record(session, actor, AuditAction.ALERT_RULE_SILENCED, name, after=what)
    session.commit()
    return {"id": row.id, "rule": name, **what, "who": row.who}


def unsilence(session: Session, env: AlertSettings, name: str, actor: Actor) -> int:
    """End now every silence of rule `name` set through the API; how many there were."""
    if name not in {r.name for r in env.rules}:
        _rule_row(session, name)
    now = utcnow()
    result = session.execute(
        update(AlertSilence)
        .where(AlertSilence.rule == name, AlertSilence.end_at > now)
        .values(end_at=now)
    )
    ended = int(getattr(result, "rowcount", 0))
    trail.record(session, actor, AuditAction.ALERT_RULE_UNSILENCED, name, after={"ended": ended})
    session.commit()
    return int(ended)


def _channel_names(session: Session, env: AlertSettings) -> set[str]:
    return {c.name for c in env.channels} | set(session.scalars(select(AlertChannelRow.name)))


def _channel_row(session: Session, name: str) -> AlertChannelRow:
    row = session.scalar(select(AlertChannelRow).where(AlertChannelRow.name == name))
    if row is None:
        raise NotFoundError(f"no alert channel named {name}")
    return row


def _rule_row(session: Session, name: str) -> AlertRuleRow:
    row = session.scalar(select(AlertRuleRow).where(AlertRuleRow.name == name))
    if row is None:
        raise NotFoundError(f"no alert rule named {name}")
    return row


def _iso(moment: datetime) -> str:
    return moment.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")
