"""The fixed vocabulary of Ays: every choice a task makes and every state a run, a node or a
task change goes through, as an enum. The tables (`ays_runtime.storage.models`) store their
values; this module depends on nothing, so the command line loads it without the database
layer.
"""

from __future__ import annotations

import enum


class TaskType(enum.StrEnum):
    SHELL = "shell"
    HTTP = "http"


class RouteStrategy(enum.StrEnum):
    FIRST = "first"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    CONSISTENT_HASH = "consistent_hash"
    LEAST_BUSY = "least_busy"
    FAILOVER = "failover"
    BROADCAST = "broadcast"


class BlockStrategy(enum.StrEnum):
    SERIAL = "serial"  # queue the new run behind the running one
    DISCARD_NEW = "discard_new"
    COVER_OLD = "cover_old"  # kill the running one, start the new one


class MisfirePolicy(enum.StrEnum):
    SKIP = "skip"
    FIRE_ONCE_NOW = "fire_once_now"


class RetryBackoff(enum.StrEnum):
    FIXED = "fixed"
    EXPONENTIAL = "exponential"


class NodeStatus(enum.StrEnum):
    UNKNOWN = "unknown"
    ONLINE = "online"  # beats, takes runs
    LEAVING = "leaving"  # stopping cleanly: still beats and finishes its runs, takes no new ones
    OFFLINE = "offline"  # missed its beats, or left


class NodeSource(enum.StrEnum):
    MANUAL = "manual"
    SELF = "self"


class RunStatus(enum.StrEnum):
    """The life of one job-log row."""

    PENDING = "pending"  # claimed the slot, not yet handed to a node
    DISPATCHED = "dispatched"  # a node has it
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    KILLED = "killed"
    NODE_LOST = "node_lost"
    SKIPPED = "skipped"  # misfire policy or block strategy chose not to run it
    DISCARDED = "discarded"

    @property
    def is_final(self) -> bool:
        return self not in {RunStatus.PENDING, RunStatus.DISPATCHED, RunStatus.RUNNING}


class TriggerKind(enum.StrEnum):
    CRON = "cron"
    MANUAL = "manual"
    MISFIRE = "misfire"
    RETRY = "retry"
    DEPENDENCY = "dependency"  # a parent task's run ended meeting the condition of an edge
    WORKFLOW = "workflow"  # a workflow run started (its first tasks)
    RERUN = "rerun"  # a failed workflow run rerun from its failed tasks on


class AfterCondition(enum.StrEnum):
    """When a parent's run fires its child (`ays_runtime.dependencies`)."""

    SUCCESS = "success"
    FAILURE = "failure"
    ALWAYS = "always"


class WorkflowRunStatus(enum.StrEnum):
    """The life of one start of a workflow (`ays_runtime.workflows`)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every task of it succeeded
    FAILED = "failed"  # a task of it failed (or the workflow timed out)
    PARTLY_SKIPPED = "partly_skipped"  # none failed, some were skipped or not fired

    @property
    def is_final(self) -> bool:
        return self != WorkflowRunStatus.RUNNING


class AfterMode(enum.StrEnum):
    """How a child with several parents fires (`ays_runtime.dependencies`)."""

    ALL = "all"  # once per slot, when every parent's run of that slot met its condition
    ANY = "any"  # once per parent run that met its condition


class SlotMissReason(enum.StrEnum):
    """Why slots of a schedule were not fired (a row of the slot ledger, `ays_slot_miss`)."""

    SKIPPED = "skipped"  # a running manager found them later than the grace: misfire policy skip
    MISSED = "missed"  # no manager was running then (found by a manager starting up)


class ChangeVia(enum.StrEnum):
    """Through what a task was changed (kept with each of its versions)."""

    API = "api"
    CONSOLE = "console"
    APPLY = "apply"  # tasks as code: POST /api/v1/apply, `aysManager apply`
    ROLLBACK = "rollback"
    MIGRATION = "migration"  # the definition a task had when its history began


class TaskChange(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    BASELINE = "baseline"  # recorded by migration 0004 for a task that existed before it


class Role(enum.StrEnum):
    """What a user may do (ays_runtime/users/access.py): each role can do what the one
    before it can, and more."""

    VIEWER = "viewer"  # read everything
    OPERATOR = "operator"  # and change tasks and runs of the node groups granted to them
    ADMIN = "admin"  # and everything else: groups, nodes, users, tokens, apply, reconcile

    @property
    def rank(self) -> int:
        return list(Role).index(self)


class AuditAction(enum.StrEnum):
    """What an audit-trail entry records (`ays_runtime.audit`)."""

    TASK_CREATED = "task.created"
    TASK_UPDATED = "task.updated"
    TASK_DELETED = "task.deleted"
    TASK_TRIGGERED = "task.triggered"
    RUN_KILLED = "run.killed"
    GROUP_CREATED = "node_group.created"
    GROUP_UPDATED = "node_group.updated"
    GROUP_DELETED = "node_group.deleted"
    NODE_ADDED = "node.added"
    NODE_REMOVED = "node.removed"
    ALERT_CHANNEL_CREATED = "alert_channel.created"
    ALERT_CHANNEL_UPDATED = "alert_channel.updated"
    ALERT_CHANNEL_DELETED = "alert_channel.deleted"
    ALERT_RULE_CREATED = "alert_rule.created"
    ALERT_RULE_UPDATED = "alert_rule.updated"
    ALERT_RULE_DELETED = "alert_rule.deleted"
    ALERT_RULE_SILENCED = "alert_rule.silenced"
    ALERT_RULE_UNSILENCED = "alert_rule.unsilenced"
    WORKFLOW_CREATED = "workflow.created"
    WORKFLOW_UPDATED = "workflow.updated"
    WORKFLOW_DELETED = "workflow.deleted"
    WORKFLOW_STARTED = "workflow.started"
    WORKFLOW_RERUN = "workflow.rerun"
    USER_CREATED = "user.created"
    USER_UPDATED = "user.updated"  # role, groups or password (never the password itself)
    USER_DELETED = "user.deleted"
    TOKEN_CREATED = "token.created"
    TOKEN_REVOKED = "token.revoked"
    # Console sign-ins with a password (ays_runtime/users/lockout.py): never the password.
    SIGN_IN_FAILED = "sign_in.failed"
    SIGN_IN_LOCKED_OUT = "sign_in.locked_out"  # a user name or a source address
    SIGN_IN_UNLOCKED = "sign_in.unlocked"  # an admin ended a user name's lock-out

    @property
    def target_type(self) -> str:
        return self.value.split(".", 1)[0]
