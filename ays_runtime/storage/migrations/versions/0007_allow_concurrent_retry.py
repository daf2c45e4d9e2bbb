"""tasks: allow_concurrent_retry, whether a run whose node was lost is retried at once

A run whose node was lost may still be running there (the node's process died, its job did
not): by default its retry now waits until the node reports the run ended, or until the run's
timeout has passed. A task that can run twice at once without harm sets this to retry at once.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN on both dialects (SQLite need not rebuild the table).
    op.add_column(
        "ays_task",
        sa.Column(
            "allow_concurrent_retry", sa.Boolean(), nullable=False, server_default=sa.false()
        ),
    )


def downgrade() -> None:
    with op.batch_alter_table("ays_task") as table:
        table.drop_column("allow_concurrent_retry")
