"""tasks: tags, short labels to find tasks by (`GET /api/v1/tasks?tag=X`)

Stored as one string, `,a,b,` (empty: no tags), so that a tag is found by `LIKE '%,a,%'` on
SQLite and MariaDB alike (`ays_runtime.storage.models.TagList`). Existing tasks have none.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN on both dialects (SQLite need not rebuild the table).
    op.add_column("ays_task", sa.Column("tags", sa.String(1024), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("ays_task") as table:
        table.drop_column("tags")
