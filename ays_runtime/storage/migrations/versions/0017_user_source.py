"""ays_user.source: where a user comes from, "local" (made by an admin, may have a password)
or "oidc" (made and updated by an OIDC console sign-in, never a password)

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("ays_user") as batch:
        batch.add_column(sa.Column("source", sa.String(16), nullable=False, server_default="local"))


def downgrade() -> None:
    with op.batch_alter_table("ays_user") as batch:
        batch.drop_column("source")
