"""task versions: every change of a task keeps its definition, who made it, through what, when

The tasks that exist already get one row each (change `baseline`, via `migration`) holding
their current definition, so a rollback can come back to it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UtcDateTime = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
MYSQL_TABLE: dict[str, Any] = {
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
    "mysql_engine": "InnoDB",
}
# The fields of a task's definition at this revision (TaskCreate's), with their types.
DEFINITION: dict[str, Any] = {
    "name": sa.String(),
    "description": sa.String(),
    "node_group": sa.String(),
    "schedule": sa.String(),
    "timezone": sa.String(),
    "task_type": sa.String(),
    "payload": sa.JSON(),
    "params": sa.String(),
    "timeout_s": sa.Integer(),
    "retry_count": sa.Integer(),
    "retry_backoff": sa.String(),
    "retry_interval_s": sa.Double(),
    "route_strategy": sa.String(),
    "block_strategy": sa.String(),
    "misfire_policy": sa.String(),
    "enabled": sa.Boolean(),
}


def upgrade() -> None:
    versions = op.create_table(
        "ays_task_version",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("change", sa.String(16), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("changed_by", sa.String(128), nullable=False),
        sa.Column("via", sa.String(16), nullable=False),
        sa.Column("changed_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_task_version")),
        sa.UniqueConstraint("task_id", "version", name=op.f("uq_ays_task_version_task_id_version")),
        **MYSQL_TABLE,
    )
    op.create_index(op.f("ix_ays_task_version_name"), "ays_task_version", ["name"])

    task = sa.table(
        "ays_task",
        sa.column("id", sa.Integer()),
        sa.column("version", sa.Integer()),
        *(sa.column(name, kind) for name, kind in DEFINITION.items()),
    )
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = [
        {
            "task_id": row.id,
            "version": row.version,
            "name": row.name,
            "change": "baseline",
            "definition": {name: getattr(row, name) for name in DEFINITION},
            "changed_by": "-",
            "via": "migration",
            "changed_at": now,
        }
        for row in op.get_bind().execute(sa.select(task))
    ]
    if rows:
        op.bulk_insert(versions, rows)


def downgrade() -> None:
    op.drop_index(op.f("ix_ays_task_version_name"), "ays_task_version")
    op.drop_table("ays_task_version")
