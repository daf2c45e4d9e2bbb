"""node groups: auto_created, a group that came into being when a node joined it

A node that joins a group the manager does not know (a heartbeat, the Consul node list, or
a node added by hand) creates it, as xxl-job's executors register their app name; the flag
tells those groups from the ones an operator created with POST /api/v1/node-groups.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN on both dialects: SQLite need not rebuild the table (ays_task's
    # foreign key points at it), and existing groups were all created by hand.
    op.add_column(
        "ays_node_group",
        sa.Column("auto_created", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    with op.batch_alter_table("ays_node_group") as table:
        table.drop_column("auto_created")
