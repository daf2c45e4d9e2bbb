"""alerts: ays_alert_delivery, the queue of alert notices per channel

Each notice a rule raises is queued here for each of its channels and stays until the channel
takes it (retried with backoff): a channel that is down, or a manager restart, loses none.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0009"
down_revision: str | None = "0008"
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
        "ays_alert_delivery",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("dedup_key", sa.String(191), nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("summary", sa.String(1024), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", UtcDateTime, nullable=False),
        sa.Column("last_error", sa.String(1024), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("sent_at", UtcDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ays_alert_delivery")),
        sa.UniqueConstraint(
            "dedup_key", "channel", name=op.f("uq_ays_alert_delivery_dedup_key_channel")
        ),
        **MYSQL_TABLE,
    )
    op.create_index(
        "ix_ays_alert_delivery_status_next_at", "ays_alert_delivery", ["status", "next_at"]
    )


def downgrade() -> None:
    op.drop_table("ays_alert_delivery")
