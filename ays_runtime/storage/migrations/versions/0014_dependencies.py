"""dependencies and workflows: a task's parents (ays_task.after, after_mode), the edge
table, job results, and workflows (ays_workflow, ays_workflow_task, ays_workflow_run)

`ays_task.after` is the definition as the API gives it (a JSON list of {task, condition});
`ays_task_edge` holds the same edges, one row per (child, parent name), for the lookups a
parent's result makes (ays_runtime/dependencies/). Existing tasks have no parents.
`ays_job_log.result`: the JSON a job wrote to AYS_RESULT_FILE, handed to its children.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UtcDateTime = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
MYSQL_TABLE: dict[str, Any] = {
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
    "mysql_engine": "InnoDB",
}


def upgrade() -> None:
    op.add_column("ays_task", sa.Column("after", sa.JSON(), nullable=True))
    op.add_column(
        "ays_task", sa.Column("after_mode", sa.String(8), nullable=False, server_default="all")
    )
    op.create_table(
        "ays_task_edge",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("child_id", sa.Integer(), nullable=False),
        sa.Column("parent_name", sa.String(128), nullable=False),
        sa.Column("condition", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_task_edge")),
        sa.ForeignKeyConstraint(
            ["child_id"],
            ["ays_task.id"],
            name=op.f("fk_ays_task_edge_child_id_ays_task"),
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint(
            "child_id", "parent_name", name=op.f("uq_ays_task_edge_child_id_parent_name")
        ),
        **MYSQL_TABLE,
    )
    op.create_index("ix_ays_task_edge_child_id", "ays_task_edge", ["child_id"])
    op.create_index("ix_ays_task_edge_parent_name", "ays_task_edge", ["parent_name"])
    op.add_column("ays_job_log", sa.Column("result", sa.Text(), nullable=True))
    op.create_table(
        "ays_workflow",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("description", sa.String(255), nullable=False),
        sa.Column("schedule", sa.String(255), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("params", sa.String(1024), nullable=False),
        sa.Column("timeout_s", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_workflow")),
        sa.UniqueConstraint("name", name=op.f("uq_ays_workflow_name")),
        **MYSQL_TABLE,
    )
    op.create_table(
        "ays_workflow_task",
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("workflow_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_ays_workflow_task")),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["ays_task.id"],
            name=op.f("fk_ays_workflow_task_task_id_ays_task"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["ays_workflow.id"],
            name=op.f("fk_ays_workflow_task_workflow_id_ays_workflow"),
            ondelete="CASCADE",
        ),
        **MYSQL_TABLE,
    )
    op.create_index("ix_ays_workflow_task_workflow_id", "ays_workflow_task", ["workflow_id"])
    op.create_table(
        "ays_workflow_run",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("workflow_id", sa.Integer(), nullable=False),
        sa.Column("scheduled_at", UtcDateTime, nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("params", sa.String(1024), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("message", sa.String(1024), nullable=False),
        sa.Column("manager_id", sa.String(64), nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=False),
        sa.Column("deadline_at", UtcDateTime, nullable=True),
        sa.Column("ended_at", UtcDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_workflow_run")),
        sa.UniqueConstraint(
            "workflow_id", "scheduled_at", name=op.f("uq_ays_workflow_run_workflow_id_scheduled_at")
        ),
        **MYSQL_TABLE,
    )
    op.create_index("ix_ays_workflow_run_status", "ays_workflow_run", ["status"])


def downgrade() -> None:
    op.drop_table("ays_workflow_run")
    op.drop_table("ays_workflow_task")
    op.drop_table("ays_workflow")
    with op.batch_alter_table("ays_job_log") as batch:
        batch.drop_column("result")
    op.drop_table("ays_task_edge")
    with op.batch_alter_table("ays_task") as batch:
        batch.drop_column("after_mode")
        batch.drop_column("after")
