"""fan-in counters: a linear fan-in of many parents

`ays_fan_in` holds, per fan-in child slot (child, scheduled time), how many of its parents'
runs of that slot have ended meeting their condition; `ays_fan_in_parent` one row per such
parent (its key keeps a parent counted once: two managers, a report twice). A parent's end
adds its row and bumps the counter in the transaction that stores the end, so the child is
checked in full only when its row is created and once the count reaches its parents'
(ays_runtime/dependencies/triggers.py). The check at creation counts the parents ended
before, so a slot half way through at the upgrade is counted right.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UtcDateTime = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
MYSQL_TABLE: dict[str, Any] = {
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
    "mysql_engine": "InnoDB",
}


def upgrade() -> None:
    op.create_table(
        "ays_fan_in",
        sa.Column("child_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("scheduled_at", UtcDateTime, nullable=False),
        sa.Column("met", sa.Integer(), nullable=False),
        sa.Column("needed", sa.Integer(), nullable=False),
        sa.Column("claim", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("child_id", "scheduled_at", name=op.f("pk_ays_fan_in")),
        **MYSQL_TABLE,
    )
    op.create_table(
        "ays_fan_in_parent",
        sa.Column("child_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("scheduled_at", UtcDateTime, nullable=False),
        sa.Column("parent_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("claim", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint(
            "child_id", "scheduled_at", "parent_id", name=op.f("pk_ays_fan_in_parent")
        ),
        **MYSQL_TABLE,
    )


def downgrade() -> None:
    op.drop_table("ays_fan_in_parent")
    op.drop_table("ays_fan_in")
