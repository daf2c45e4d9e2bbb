"""alert policies through the API: ays_alert_channel, ays_alert_rule, ays_alert_silence

Channels and rules made through the API or the console (the env file's own are not stored),
and silence windows set on any rule.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0013"
down_revision: str | None = "0012"
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
        "ays_alert_channel",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("secret", sa.Text(), nullable=True),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_alert_channel")),
        sa.UniqueConstraint("name", name=op.f("uq_ays_alert_channel_name")),
        **MYSQL_TABLE,
    )
    op.create_table(
        "ays_alert_rule",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_alert_rule")),
        sa.UniqueConstraint("name", name=op.f("uq_ays_alert_rule_name")),
        **MYSQL_TABLE,
    )
    op.create_table(
        "ays_alert_silence",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("start_at", UtcDateTime, nullable=False),
        sa.Column("end_at", UtcDateTime, nullable=False),
        sa.Column("who", sa.String(128), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_alert_silence")),
        **MYSQL_TABLE,
    )
    op.create_index("ix_ays_alert_silence_rule_end_at", "ays_alert_silence", ["rule", "end_at"])


def downgrade() -> None:
    op.drop_table("ays_alert_silence")
    op.drop_table("ays_alert_rule")
    op.drop_table("ays_alert_channel")
