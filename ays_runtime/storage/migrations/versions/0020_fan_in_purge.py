"""fan-in counters: an index on the slot, for the retention purge

`ays_fan_in` and `ays_fan_in_parent` age with the job logs of their slot: the retention
purge (ays_runtime/manager/retention.py) reads the oldest rows by `scheduled_at` in bounded
batches, which without this index would scan the whole table each batch.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_ays_fan_in_scheduled_at", "ays_fan_in", ["scheduled_at"])
    op.create_index("ix_ays_fan_in_parent_scheduled_at", "ays_fan_in_parent", ["scheduled_at"])


def downgrade() -> None:
    op.drop_index("ix_ays_fan_in_parent_scheduled_at", table_name="ays_fan_in_parent")
    op.drop_index("ix_ays_fan_in_scheduled_at", table_name="ays_fan_in")
