"""job logs: due_at, when a pending retry may be dispatched

A retry waiting its backoff is a pending row from the moment its run failed, so a manager
that stops, restarts or reloads meanwhile loses none: the next process dispatches the row
once `due_at` has passed.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UtcDateTime = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    with op.batch_alter_table("ays_job_log") as table:
        table.add_column(sa.Column("due_at", UtcDateTime, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ays_job_log") as table:
        table.drop_column("due_at")
