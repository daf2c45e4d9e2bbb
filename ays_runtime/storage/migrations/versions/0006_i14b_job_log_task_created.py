"""job logs: an index on (task_id, created_at), for a task's run history

The console's task page and the run list filtered by task read a task's runs newest first;
without this index the database sorts every run of the task on each page (86,400 a day for
an every-second task). The slot key's index starts with task_id too, but orders by
scheduled_at.

Revision ID: 0006_i14b_job_log_task_created
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006_i14b_job_log_task_created"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_ays_job_log_task_created", "ays_job_log", ["task_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_ays_job_log_task_created", table_name="ays_job_log")
