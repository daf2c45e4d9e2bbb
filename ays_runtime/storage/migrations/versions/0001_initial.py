"""initial schema: node groups, tasks, the timer list, nodes, job logs

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As in models.py at this revision (a migration never imports the models).
UtcDateTime = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# utf8mb4 for emoji and CJK; the binary collation compares names exactly, as SQLite does
# (the *_ci collations fold case and treat every emoji as equal in unique keys).
MYSQL_TABLE: dict[str, Any] = {
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
    "mysql_engine": "InnoDB",
}


def upgrade() -> None:
    op.create_table(
        "ays_node_group",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("description", sa.String(255), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_node_group")),
        sa.UniqueConstraint("name", name=op.f("uq_ays_node_group_name")),
        **MYSQL_TABLE,
    )

    op.create_table(
        "ays_task",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("description", sa.String(255), nullable=False),
        sa.Column("node_group", sa.String(64), nullable=False),
        sa.Column("schedule", sa.String(255), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("task_type", sa.String(16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("params", sa.String(1024), nullable=False),
        sa.Column("timeout_s", sa.Integer(), nullable=False),
        sa.Column("retry_count", sa.Integer(), nullable=False),
        sa.Column("retry_backoff", sa.String(16), nullable=False),
        sa.Column("retry_interval_s", sa.Double(), nullable=False),
        sa.Column("route_strategy", sa.String(32), nullable=False),
        sa.Column("block_strategy", sa.String(32), nullable=False),
        sa.Column("misfire_policy", sa.String(32), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_task")),
        sa.UniqueConstraint("name", name=op.f("uq_ays_task_name")),
        sa.ForeignKeyConstraint(
            ["node_group"],
            ["ays_node_group.name"],
            name=op.f("fk_ays_task_node_group_ays_node_group"),
            ondelete="RESTRICT",
            onupdate="CASCADE",
        ),
        **MYSQL_TABLE,
    )
    op.create_index(op.f("ix_ays_task_enabled"), "ays_task", ["enabled"])

    # One row per (manager, task): every manager holds every timer. No foreign key to
    # ays_task: reconciliation must see the rows of deleted tasks.
    op.create_table(
        "ays_timer_list",
        sa.Column("manager_id", sa.String(64), nullable=False),
        sa.Column("task_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("schedule", sa.String(255), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("next_fire_time", UtcDateTime, nullable=True),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("manager_id", "task_id", name=op.f("pk_ays_timer_list")),
        **MYSQL_TABLE,
    )

    op.create_table(
        "ays_node",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ip", sa.String(45), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("node_group", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("running_jobs", sa.Integer(), nullable=False),
        sa.Column("last_seen", UtcDateTime, nullable=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_node")),
        sa.UniqueConstraint("ip", "port", name=op.f("uq_ays_node_ip_port")),
        **MYSQL_TABLE,
    )
    op.create_index(op.f("ix_ays_node_node_group"), "ays_node", ["node_group"])

    op.create_table(
        "ays_job_log",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("scheduled_at", UtcDateTime, nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("shard_index", sa.Integer(), nullable=False),
        sa.Column("shard_total", sa.Integer(), nullable=False),
        sa.Column("params", sa.String(1024), nullable=False),
        sa.Column("claim", sa.String(32), nullable=False),
        sa.Column("manager_id", sa.String(64), nullable=False),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=True),
        sa.Column("ended_at", UtcDateTime, nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("output", sa.Text(), nullable=False),
        sa.Column("message", sa.String(1024), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_job_log")),
        # The slot key: one fire of a task's scheduled time is inserted once, by one manager.
        sa.UniqueConstraint(
            "task_id", "scheduled_at", "attempt", "shard_index", name=op.f("uq_job_log_slot")
        ),
        **MYSQL_TABLE,
    )
    op.create_index(op.f("ix_ays_job_log_status_created"), "ays_job_log", ["status", "created_at"])
    op.create_index(op.f("ix_ays_job_log_created_at"), "ays_job_log", ["created_at"])
    op.create_index(op.f("ix_ays_job_log_claim"), "ays_job_log", ["claim"])
    op.create_index(op.f("ix_ays_job_log_node"), "ays_job_log", ["node"])


def downgrade() -> None:
    op.drop_table("ays_job_log")
    op.drop_table("ays_node")
    op.drop_table("ays_timer_list")
    op.drop_table("ays_task")
    op.drop_table("ays_node_group")
