"""The tables of Ays (SQLAlchemy 2 declarative). Alembic migrations own the schema.

All datetimes are naive UTC; on MySQL/MariaDB they are DATETIME(6) so that sub-second
scheduled times (`@every 500ms`, manual triggers) stay distinct in the slot key.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ays_runtime.vocabulary import (  # the columns' choices and states
    AfterMode,
    BlockStrategy,
    MisfirePolicy,
    NodeSource,
    NodeStatus,
    RetryBackoff,
    RouteStrategy,
    RunStatus,
    SlotMissReason,
    TaskType,
    TriggerKind,
)

# Constraint names fixed by convention so migrations are identical on every dialect.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UtcDateTime = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# SQLite only has 64-bit integer rowids when the type is exactly INTEGER.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class TagList(TypeDecorator[list[str]]):
    """A task's tags (valid, sorted, no duplicates: `schemas.Tags`) stored as one string,
    `,a,b,`, empty for none: a tag is then found on SQLite and MariaDB alike by
    `LIKE '%,a,%'` (`has_tag`), a scan that takes milliseconds over 10k tasks."""

    impl = String(1024)  # at most 20 tags of at most 32 characters, with their commas
    cache_ok = True

    def process_bind_param(self, value: list[str] | None, dialect: Any) -> str:
        return f",{','.join(value)}," if value else ""

    def process_result_value(self, value: str | None, dialect: Any) -> list[str]:
        return [tag for tag in (value or "").split(",") if tag]

    def coerce_compared_value(self, op: Any, value: Any) -> Any:
        return String()  # `has_tag` compares the stored text with a pattern, not a list


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class NodeGroup(Base):
    __tablename__ = "ays_node_group"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(String(255), default="")
    # True when a node joining it created the group (see registry.base.ensure_node_groups);
    # False when an operator did (POST /api/v1/node-groups).
    auto_created: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Task(Base):
    __tablename__ = "ays_task"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str] = mapped_column(String(255), default="")
    node_group: Mapped[str] = mapped_column(
        String(64), ForeignKey("ays_node_group.name", ondelete="RESTRICT", onupdate="CASCADE")
    )
    schedule: Mapped[str] = mapped_column(String(255))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    task_type: Mapped[str] = mapped_column(String(16), default=TaskType.SHELL.value)
    # shell: {command, env, workdir}; http: {url, method, headers, body, expected_status}
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    params: Mapped[str] = mapped_column(String(1024), default="")
    timeout_s: Mapped[int] = mapped_column(Integer, default=0)  # 0 = no timeout
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    retry_backoff: Mapped[str] = mapped_column(String(16), default=RetryBackoff.FIXED.value)
    # Double, not Float: MySQL's FLOAT is single precision.
    retry_interval_s: Mapped[float] = mapped_column(Double, default=10.0)
    # A run whose node was lost may still be running there: its retry waits until the node
    # reports it ended (or until a bound), unless this is set.
    allow_concurrent_retry: Mapped[bool] = mapped_column(Boolean, default=False)
    route_strategy: Mapped[str] = mapped_column(String(32), default=RouteStrategy.FIRST.value)
    block_strategy: Mapped[str] = mapped_column(String(32), default=BlockStrategy.SERIAL.value)
    misfire_policy: Mapped[str] = mapped_column(String(32), default=MisfirePolicy.SKIP.value)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    tags: Mapped[list[str]] = mapped_column(TagList, default=list, server_default="")
    # Parent tasks, each {"task": name, "condition": AfterCondition}; the definition as the
    # API gives it. `ays_task_edge` holds the same edges for the lookups (dependencies/).
    after: Mapped[list[dict[str, str]] | None] = mapped_column(JSON, nullable=True, default=list)
    after_mode: Mapped[str] = mapped_column(
        String(8), default=AfterMode.ALL.value, server_default=AfterMode.ALL.value
    )
    # Bumped on every change; the timer list installs a (schedule, version) pair.
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


def has_tag(tag: str) -> ColumnElement[bool]:
    """The tasks that carry `tag` (see TagList)."""
    return Task.tags.contains(f",{tag},", autoescape=True)


class TaskEdge(Base):
    """One edge of the dependency graph: `child_id` fires after the task named `parent_name`
    (`ays_runtime.dependencies`). By name, not id, so that a parent deleted is seen as such
    on its child, and a task created again under that name is the parent again; a rename
    rewrites the edges (and the children's `after`)."""

    __tablename__ = "ays_task_edge"
    __table_args__ = (UniqueConstraint("child_id", "parent_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    child_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("ays_task.id", ondelete="CASCADE"), index=True
    )
    parent_name: Mapped[str] = mapped_column(String(128), index=True)
    condition: Mapped[str] = mapped_column(String(16))


class FanIn(Base):
    """A fan-in child's slot: how many of its parents' runs of the slot ended meeting their
    condition (`ays_runtime.dependencies.triggers`); bumped under its row lock, so the parent
    that completes the count sees it, whichever manager stores it."""

    __tablename__ = "ays_fan_in"
    __table_args__ = (Index("ix_ays_fan_in_scheduled_at", "scheduled_at"),)  # the purge

    child_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    scheduled_at: Mapped[datetime] = mapped_column(UtcDateTime, primary_key=True)
    met: Mapped[int] = mapped_column(Integer)
    needed: Mapped[int] = mapped_column(Integer)  # its parents counted when last checked
    claim: Mapped[str] = mapped_column(String(32))  # the transaction that created the row


class FanInParent(Base):
    """A parent counted in a fan-in child's slot: its key counts the parent once."""

    __tablename__ = "ays_fan_in_parent"
    __table_args__ = (Index("ix_ays_fan_in_parent_scheduled_at", "scheduled_at"),)  # the purge

    child_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    scheduled_at: Mapped[datetime] = mapped_column(UtcDateTime, primary_key=True)
    parent_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    claim: Mapped[str] = mapped_column(String(32))  # the transaction that counted it


class Workflow(Base):
    """A named set of tasks started together (`ays_runtime.workflows`): by its schedule, or
    by hand; its edges are its tasks' `after`."""

    __tablename__ = "ays_workflow"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str] = mapped_column(String(255), default="")
    schedule: Mapped[str] = mapped_column(String(255), default="")  # "": by hand only
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    params: Mapped[str] = mapped_column(String(1024), default="")
    timeout_s: Mapped[int] = mapped_column(Integer, default=0)  # the whole run; 0 = none
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class WorkflowTask(Base):
    """A task of a workflow; a task belongs to one workflow at most."""

    __tablename__ = "ays_workflow_task"

    task_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("ays_task.id", ondelete="CASCADE"), primary_key=True
    )
    workflow_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("ays_workflow.id", ondelete="CASCADE"), index=True
    )


class WorkflowRun(Base):
    """One start of a workflow: every task of it runs with the slot `scheduled_at` (the key
    of their job-log rows) and the params `params`. Unique per (workflow, slot): a schedule's
    slot is started once, whichever manager gets there first."""

    __tablename__ = "ays_workflow_run"
    __table_args__ = (
        UniqueConstraint("workflow_id", "scheduled_at"),
        Index("ix_ays_workflow_run_status", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    workflow_id: Mapped[int] = mapped_column(Integer)  # no FK: the history outlives it
    scheduled_at: Mapped[datetime] = mapped_column(UtcDateTime)
    trigger: Mapped[str] = mapped_column(String(16))  # cron or manual
    params: Mapped[str] = mapped_column(String(1024), default="")
    status: Mapped[str] = mapped_column(String(16))  # WorkflowRunStatus
    message: Mapped[str] = mapped_column(String(1024), default="")
    manager_id: Mapped[str] = mapped_column(String(64), default="")
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    deadline_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class TaskVersion(Base):
    """One version of a task's definition: written with every change of the task, in the
    change's own transaction, with who made it, through what and when.

    `version` is the task's version after the change (`Task.version`); a deletion is one more
    row, numbered after the last version, holding the definition that was deleted. No foreign
    key: the history outlives the task. When a task is deleted its rows' `task_id` becomes
    NULL (the database may give the id to a new task); they stay readable by `name`.
    """

    __tablename__ = "ays_task_version"
    __table_args__ = (UniqueConstraint("task_id", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    task_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    version: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(128), index=True)  # the task's name then
    change: Mapped[str] = mapped_column(String(16))
    # Every field of TaskCreate, as stored (what `apply` and a rollback write back).
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)
    changed_by: Mapped[str] = mapped_column(String(128))  # "token", or a name a caller gave
    via: Mapped[str] = mapped_column(String(16))
    changed_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AuditEntry(Base):
    """One change an operator made (`ays_runtime.audit`): who, through what, from where,
    when, what (`action`, `target_type`, `target`), and the definition before and after.
    No foreign key: the trail outlives what it names."""

    __tablename__ = "ays_audit"
    __table_args__ = (Index("ix_ays_audit_target", "target_type", "target"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    who: Mapped[str] = mapped_column(String(128))
    via: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(64))  # the caller's address; "" when none
    action: Mapped[str] = mapped_column(String(32))
    target_type: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(255))  # a name, or "id 42" / "ip:port"
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class User(Base):
    """A person who signs in to the console or calls the API with a personal token
    (`ays_runtime.users`). `groups`: the node groups an operator may change."""

    __tablename__ = "ays_user"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    password_hash: Mapped[str] = mapped_column(String(255), default="")  # "": no password
    # "local", or "oidc": made and updated by an OIDC sign-in (ays_runtime/console/oidc.py)
    source: Mapped[str] = mapped_column(String(16), default="local", server_default="local")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class UserToken(Base):
    """A personal API token: only its SHA-256 is kept (the token is shown once), with its
    first characters (`prefix`) so that its holder can tell which one it is."""

    __tablename__ = "ays_user_token"
    __table_args__ = (UniqueConstraint("user_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(Integer, ForeignKey("ays_user.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the token
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class SignInLimit(Base):
    """Failed console sign-ins of one user name (`kind` "account") or from one source
    address ("address") in the current window, and until when they are locked out
    (`ays_runtime.users.lockout`). Purged once `last_at` is older than the window and the
    lock-out both."""

    __tablename__ = "ays_sign_in_limit"
    __table_args__ = (UniqueConstraint("kind", "key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    key: Mapped[str] = mapped_column(String(64))  # a user name (at most 64) or an IP address
    failures: Mapped[int] = mapped_column(Integer)
    first_at: Mapped[datetime] = mapped_column(UtcDateTime)  # the window's start
    last_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    locked_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class TimerRow(Base):
    """One installed timer: which task version a manager's in-memory timer list holds.

    No foreign key to ays_task on purpose: reconciliation must see (and remove) the rows of
    tasks that were deleted.
    """

    __tablename__ = "ays_timer_list"

    # Each manager holds the timers of its share of the tasks (scheduler/ownership.py) and has
    # its own rows; its id is its stable ip:port. During a move two may hold one task for a
    # moment (the job-log slot key stops a double fire).
    manager_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    schedule: Mapped[str] = mapped_column(String(255))
    timezone: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    next_fire_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Node(Base):
    __tablename__ = "ays_node"
    __table_args__ = (UniqueConstraint("ip", "port"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ip: Mapped[str] = mapped_column(String(45))
    port: Mapped[int] = mapped_column(Integer)
    node_group: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default=NodeStatus.UNKNOWN.value)
    source: Mapped[str] = mapped_column(String(16), default=NodeSource.MANUAL.value)
    version: Mapped[str] = mapped_column(String(32), default="")
    running_jobs: Mapped[int] = mapped_column(Integer, default=0)
    last_seen: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # The load its last heartbeat reported (built-in registry); None when it reported none
    # (a node of an older version, a node added by hand, the Consul registry).
    load_1m: Mapped[float | None] = mapped_column(Double, nullable=True)
    cpu_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    memory_percent: Mapped[float | None] = mapped_column(Double, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


class Manager(Base):
    """A manager that has run against this database, and when it was last seen alive (it
    refreshes `last_seen` every `manager.beat_interval` while it runs). The live ones divide
    the tasks among themselves (scheduler/ownership.py)."""

    __tablename__ = "ays_manager"

    manager_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # ip:port
    version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_seen: Mapped[datetime] = mapped_column(UtcDateTime)
    # Set by a clean stop (not by a reload's old process): gone at once, not when silent.
    stopped_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class JobLog(Base):
    """One run. The row with attempt 0 and shard 0 is the slot claim: its unique key
    (task_id, scheduled_at, attempt, shard_index) means a slot can be inserted once, by one
    manager; retries and broadcast shards are further rows of the same slot."""

    __tablename__ = "ays_job_log"
    __table_args__ = (
        UniqueConstraint(
            "task_id", "scheduled_at", "attempt", "shard_index", name="uq_job_log_slot"
        ),
        Index("ix_ays_job_log_status_created", "status", "created_at"),
        Index("ix_ays_job_log_created_at", "created_at"),
        # A task's runs newest first (its run history, the run list by task).
        Index("ix_ays_job_log_task_created", "task_id", "created_at"),
        Index("ix_ays_job_log_claim", "claim"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(Integer)
    scheduled_at: Mapped[datetime] = mapped_column(UtcDateTime)
    trigger: Mapped[str] = mapped_column(String(16), default=TriggerKind.CRON.value)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    shard_index: Mapped[int] = mapped_column(Integer, default=0)
    shard_total: Mapped[int] = mapped_column(Integer, default=1)
    params: Mapped[str] = mapped_column(String(1024), default="")
    # Which insert batch claimed the row; lets a manager learn which of its bulk
    # INSERT-IGNOREd rows were its own without RETURNING (MySQL has none).
    claim: Mapped[str] = mapped_column(String(32), default="")
    manager_id: Mapped[str] = mapped_column(String(64), default="")
    node: Mapped[str] = mapped_column(String(64), default="", index=True)
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.PENDING.value)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # A pending retry is dispatched once this has passed (its backoff); None: at once.
    due_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    output: Mapped[str] = mapped_column(Text, default="")
    message: Mapped[str] = mapped_column(String(1024), default="")
    # The JSON the job wrote to AYS_RESULT_FILE (its children's AYS_PARENT_RESULTS); None: none
    result: Mapped[str | None] = mapped_column(Text, nullable=True)


class SlotMiss(Base):
    """Slots of a task's schedule that were not fired, as a range: the slots in
    [first_at, end_at) (end_at is the next slot the schedule fired or was to fire), how many,
    and why (`SlotMissReason`). Written by the claim writer (scheduler/ledger.py); the key
    (task_id, first_at) makes two managers that find the same range record it once (the
    later, longer one widens it). No foreign key: like the job log, it outlives the task."""

    __tablename__ = "ays_slot_miss"
    __table_args__ = (
        UniqueConstraint("task_id", "first_at"),
        Index("ix_ays_slot_miss_end_at", "end_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(Integer)
    first_at: Mapped[datetime] = mapped_column(UtcDateTime)
    end_at: Mapped[datetime] = mapped_column(UtcDateTime)
    slot_count: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(16), default=SlotMissReason.MISSED.value)
    manager_id: Mapped[str] = mapped_column(String(64))  # the manager that found it
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AlertDelivery(Base):
    """One alert notice for one channel, queued until the channel takes it (alerts/outbox.py).
    `dedup_key` names what the notice is about (a rule and a run, a streak, a test): with the
    channel it is unique, so a notice is queued once whichever manager sees it first."""

    __tablename__ = "ays_alert_delivery"
    __table_args__ = (
        UniqueConstraint("dedup_key", "channel"),
        Index("ix_ays_alert_delivery_status_next_at", "status", "next_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    dedup_key: Mapped[str] = mapped_column(String(191))
    channel: Mapped[str] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # firing, resolved, test
    summary: Mapped[str] = mapped_column(String(1024))
    payload: Mapped[str] = mapped_column(Text)  # the JSON document a channel sends
    status: Mapped[str] = mapped_column(String(16))  # queued, sent, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_error: Mapped[str] = mapped_column(String(1024), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class AlertChannelRow(Base):
    """An alert channel made through the API (alerts/policies.py); the env file's own are not
    stored. `definition` is the channel's settings without its secret, which is kept apart in
    `secret` (the webhook's HMAC key or the SMTP password) and never read back by the API."""

    __tablename__ = "ays_alert_channel"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    type: Mapped[str] = mapped_column(String(16))
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)
    secret: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AlertRuleRow(Base):
    """An alert rule made through the API: its settings as `AlertRule` takes them."""

    __tablename__ = "ays_alert_rule"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AlertSilence(Base):
    """A window in which a rule (of the env file or of the API) sends nothing, set through
    the API or the console. No foreign key: a silence may name an env-file rule."""

    __tablename__ = "ays_alert_silence"
    __table_args__ = (Index("ix_ays_alert_silence_rule_end_at", "rule", "end_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rule: Mapped[str] = mapped_column(String(64))
    start_at: Mapped[datetime] = mapped_column(UtcDateTime)
    end_at: Mapped[datetime] = mapped_column(UtcDateTime)
    who: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
