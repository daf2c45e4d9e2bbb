"""slot ledger: ays_slot_miss, the slots a task's schedule owed that were not fired

One row per range of a task's slots that no manager fired: skipped by the misfire policy
`skip` (a running manager found them late) or missed while no manager was running (found by
a manager starting up). Unique per (task, first slot): managers finding the same range at
once record it once.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0011"
down_revision: str | None = "0010"
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
    op.create_table(
        "ays_slot_miss",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("first_at", UtcDateTime, nullable=False),
        sa.Column("end_at", UtcDateTime, nullable=False),
        sa.Column("slot_count", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("manager_id", sa.String(64), nullable=False),
        sa.Column("recorded_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_slot_miss")),
        sa.UniqueConstraint("task_id", "first_at", name=op.f("uq_ays_slot_miss_task_id_first_at")),
        **MYSQL_TABLE,
    )
    op.create_index("ix_ays_slot_miss_end_at", "ays_slot_miss", ["end_at"])


def downgrade() -> None:
    op.drop_table("ays_slot_miss")
