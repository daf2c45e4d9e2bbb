"""sign-in limits: ays_sign_in_limit

Failed console sign-ins counted per user name and per source address (one row each), with
the window's start, the last failure and the end of a lock-out, so that every manager of an
env counts them together (ays_runtime/users/lockout.py). Rows age out by `last_at`.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0019"
down_revision: str | None = "0018"
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
        "ays_sign_in_limit",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("first_at", UtcDateTime, nullable=False),
        sa.Column("last_at", UtcDateTime, nullable=False),
        sa.Column("locked_until", UtcDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_sign_in_limit")),
        sa.UniqueConstraint("kind", "key", name=op.f("uq_ays_sign_in_limit_kind_key")),
        **MYSQL_TABLE,
    )
    op.create_index(
        op.f("ix_ays_sign_in_limit_last_at"), "ays_sign_in_limit", ["last_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_ays_sign_in_limit_last_at"), table_name="ays_sign_in_limit")
    op.drop_table("ays_sign_in_limit")
