"""nodes: the load their last heartbeat reported (load_1m, cpu_count, memory_percent)

Built-in registry: a node beats with its 1-minute load average, its CPU count and the memory
used (%); the manager keeps the last one on the node's row, so every manager sharing the
database shows it (console nodes page, GET /api/v1/nodes). Nullable: a node of an older
version, a node added by hand or followed through Consul reports none.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMNs on both dialects (nullable: SQLite need not rebuild the table).
    op.add_column("ays_node", sa.Column("load_1m", sa.Double(), nullable=True))
    op.add_column("ays_node", sa.Column("cpu_count", sa.Integer(), nullable=True))
    op.add_column("ays_node", sa.Column("memory_percent", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ays_node") as table:
        table.drop_column("memory_percent")
        table.drop_column("cpu_count")
        table.drop_column("load_1m")
