"""The env file's `alerts` section: channels, rules, and how deliveries are retried.

alerts:
  channels:
    - {name: ops-hook, type: webhook, url: "https://hooks.example/ays", secret: "${AYS_ALERT_KEY}"}
    - {name: ops-mail, type: email, host: smtp.example, port: 587, starttls: true,
       username: ays, password: "${AYS_SMTP_PASSWORD}", sender: ays@example, to: [ops@example]}
  rules:
    - {name: failed, when: run_failed, channels: [ops-hook]}
    - {name: three-in-a-row, when: consecutive_failures, count: 3, node_groups: [ksa],
       channels: [ops-mail],
       silences: [{start: "2026-12-24T00:00:00Z", end: "2026-12-27T00:00:00Z"}]}
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WebhookChannel(_Section):
    name: str = Field(pattern=NAME, description="the name rules use")
    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://", description="where the JSON notice is POSTed")
    format: Literal["ays", "slack", "dingtalk", "wecom", "feishu"] = Field(
        "ays",
        description="ays: the notice's JSON document; slack, dingtalk, wecom, feishu: a text "
        "message in that service's incoming-webhook format",
    )
    secret: SecretStr | None = Field(
        None,
        description="ays: key of the HMAC-SHA256 of the body (X-Ays-Signature: sha256=<hex>); "
        "dingtalk, feishu: the robot's signing secret (their own signature schemes)",
    )
    timeout: float = Field(10.0, gt=0, le=120, description="seconds to wait for an answer")

    @model_validator(mode="after")
    def _signable(self) -> WebhookChannel:
        if self.secret is not None and self.format in ("slack", "wecom"):
            raise ValueError(
                f"channel {self.name}: {self.format} webhooks are not signed; remove its secret "
                "(the URL itself is the secret)"
            )
        return self


class EmailChannel(_Section):
    name: str = Field(pattern=NAME, description="the name rules use")
    type: Literal["email"]
    host: str = Field(min_length=1, description="SMTP server")
    port: int = Field(587, ge=1, le=65535)
    starttls: bool = Field(True, description="upgrade the connection with STARTTLS first")
    username: str | None = Field(None, description="SMTP AUTH user (none: no AUTH)")
    password: SecretStr | None = None
    sender: str = Field(pattern=r"^[^@\s]+@[^@\s]+$", description="the From address")
    to: list[Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$")]] = Field(min_length=1)
    timeout: float = Field(10.0, gt=0, le=120, description="seconds for each SMTP step")


Channel = Annotated[WebhookChannel | EmailChannel, Field(discriminator="type")]


class Silence(_Section):
    """A window in which a rule sends nothing (UTC unless the times say otherwise)."""

    start: datetime
    end: datetime

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)

    @model_validator(mode="after")
    def _ordered(self) -> Silence:
        if self.end <= self.start:
            raise ValueError("a silence's end must be after its start")
        return self

    def covers(self, moment: datetime) -> bool:
        return self.start <= moment < self.end


class AlertRule(_Section):
    name: str = Field(pattern=NAME)
    when: Literal[
        "run_failed",
        "consecutive_failures",
        "started_late",
        "running_longer_than",
        "node_offline",
        "group_unhealthy",
        "slot_missed",
    ] = Field(
        description="run_failed: every run that failed for good (timed out, node lost too; "
        "after its retries); consecutive_failures: `count` such runs in a row, once per streak; "
        "started_late: a run that started more than `seconds` after its scheduled time (judged "
        "when it ends); "
        "running_longer_than: a run still unfinished `seconds` after it started, or (with "
        "`factor`) after `factor` times the task's usual duration, the p95 of its last "
        "`history` successful runs; "
        "node_offline: a node went offline; group_unhealthy: a node group with enabled tasks "
        "has no online node; slot_missed: slots of a task's schedule that were not fired (a "
        "range of the slot ledger: missed while no manager was running, or skipped by the "
        "misfire policy), one notice per range"
    )
    count: int = Field(3, ge=2, le=1000, description="runs in a row (consecutive_failures)")
    seconds: float = Field(
        3600.0, gt=0, description="the limit of running_longer_than and started_late"
    )
    factor: float | None = Field(
        None,
        gt=1,
        le=1000,
        description="running_longer_than: also when a run has taken `factor` times the p95 of "
        "the task's last `history` successful runs (needs 3 of them)",
    )
    history: int = Field(
        20, ge=3, le=1000, description="running_longer_than: successful runs the p95 is of"
    )
    tasks: list[str] = Field([], description="task names it watches (none: every task)")
    node_groups: list[str] = Field([], description="node groups it watches (none: every one)")
    channels: list[str] = Field(min_length=1, description="channel names it notifies")
    recovery: bool = Field(True, description="notify when the task succeeds again")
    silences: list[Silence] = Field([], description="windows in which it sends nothing")

    @property
    def periodic(self) -> bool:
        """Judged by looking at the state every alerts.watch_interval, not at stored runs."""
        return self.when in (
            "running_longer_than",
            "node_offline",
            "group_unhealthy",
            "slot_missed",
        )

    @property
    def episodic(self) -> bool:
        """Opens and closes (firing, then resolved) with the state of a node or a group."""
        return self.when in ("node_offline", "group_unhealthy")

    def watches(self, task_name: str, node_group: str) -> bool:
        return (not self.tasks or task_name in self.tasks) and (
            not self.node_groups or node_group in self.node_groups
        )

    def silenced(self, moment: datetime) -> bool:
        return any(silence.covers(moment) for silence in self.silences)


class AlertSettings(_Section):
    channels: list[Channel] = Field([], description="where notices go")
    rules: list[AlertRule] = Field([], description="what raises a notice, and to which channels")
    retry_first: float = Field(
        5.0, gt=0, description="seconds before a delivery that failed is tried again"
    )
    retry_max: float = Field(300.0, gt=0, description="the longest wait between two tries")
    max_attempts: int = Field(
        200, ge=1, description="tries before a delivery is given up (status failed)"
    )
    watch_interval: float = Field(
        10.0, gt=0, description="seconds between looks at nodes and running runs"
    )

    @model_validator(mode="after")
    def _consistent(self) -> AlertSettings:
        names = [c.name for c in self.channels]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"channel names must be unique: {', '.join(twice)} repeated")
        rules = [r.name for r in self.rules]
        twice = sorted({n for n in rules if rules.count(n) > 1})
        if twice:
            raise ValueError(f"rule names must be unique: {', '.join(twice)} repeated")
        for rule in self.rules:
            unknown = [c for c in rule.channels if c not in names]
            if unknown:
                raise ValueError(
                    f"rule {rule.name}: no channel named {', '.join(unknown)}; "
                    f"declare it under alerts.channels (known: {', '.join(names) or 'none'})"
                )
        return self

    def channel(self, name: str) -> WebhookChannel | EmailChannel | None:
        return next((c for c in self.channels if c.name == name), None)
