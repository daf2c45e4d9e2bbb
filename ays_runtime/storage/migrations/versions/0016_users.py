"""users and personal API tokens: ays_user, ays_user_token

A user has a role (viewer, operator, admin), the node groups an operator may change, and an
argon2 hash of the console password; a token is kept as its SHA-256 only, with its first
characters to tell it apart.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0016"
down_revision: str | None = "0015"
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
        "ays_user",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_user")),
        sa.UniqueConstraint("name", name=op.f("uq_ays_user_name")),
        **MYSQL_TABLE,
    )
    op.create_table(
        "ays_user_token",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("last_used_at", UtcDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_user_token")),
        sa.UniqueConstraint("user_id", "name", name=op.f("uq_ays_user_token_user_id_name")),
        sa.UniqueConstraint("digest", name=op.f("uq_ays_user_token_digest")),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["ays_user.id"],
            name=op.f("fk_ays_user_token_user_id_ays_user"),
            ondelete="CASCADE",
        ),
        **MYSQL_TABLE,
    )


def downgrade() -> None:
    op.drop_table("ays_user_token")
    op.drop_table("ays_user")
