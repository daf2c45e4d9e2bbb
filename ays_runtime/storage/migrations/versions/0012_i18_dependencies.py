"""dependencies: a task's parents (ays_task.after, after_mode) and the edge table

`ays_task.after` is the definition as the API gives it (a JSON list of {task, condition});
`ays_task_edge` holds the same edges, one row per (child, parent name), for the lookups a
parent's result makes (ays_runtime/dependencies/). Existing tasks have no parents.
`ays_job_log.result`: the JSON a job wrote to AYS_RESULT_FILE, handed to its children.

Revision ID: 0012_i18
Revises: 0011
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0012_i18"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

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


def downgrade() -> None:
    with op.batch_alter_table("ays_job_log") as batch:
        batch.drop_column("result")
    op.drop_table("ays_task_edge")
    with op.batch_alter_table("ays_task") as batch:
        batch.drop_column("after_mode")
        batch.drop_column("after")
