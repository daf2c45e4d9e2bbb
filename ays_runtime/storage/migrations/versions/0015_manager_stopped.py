"""managers: stopped_at, when a manager stopped cleanly (NULL while it runs)

Managers sharing a database divide the tasks among the live ones (scheduler/ownership.py). A
manager that stops cleanly says so here, so that its share moves at the peers' next beat
instead of after `manager.silent_after`, and its pending runs are adopted at once.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UtcDateTime = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.add_column("ays_manager", sa.Column("stopped_at", UtcDateTime, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ays_manager") as table:
        table.drop_column("stopped_at")
