"""every table utf8mb4 with the binary collation, on MySQL/MariaDB: mend the ones that are not

A database migrated through a `mariadb+pymysql://` storage URL before this revision got its
tables in the database's default character set: SQLAlchemy's "mariadb" dialect does not apply
the `mysql_charset` and `mysql_collate` every migration gives (Ays now speaks to MariaDB
through the "mysql" dialect, `storage.database.make_engine`). On many servers that default is
latin1, which refuses CJK and emoji and folds case in unique names. Such tables are converted
to utf8mb4_bin, the character set and collation every revision declares; a table already
utf8mb4_bin throughout is left alone, so this changes nothing on a database migrated through
`mysql+pymysql://`, nor on SQLite.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Ays's tables whose table or text columns are not utf8mb4_bin.
NOT_UTF8MB4_BIN = sa.text(
    "SELECT DISTINCT t.table_name FROM information_schema.tables t"
    " LEFT JOIN information_schema.columns c"
    " ON c.table_schema = t.table_schema AND c.table_name = t.table_name"
    " WHERE t.table_schema = DATABASE() AND t.table_name LIKE 'ays\\_%'"
    " AND (t.table_collation <> 'utf8mb4_bin'"
    " OR (c.collation_name IS NOT NULL AND c.collation_name <> 'utf8mb4_bin'))"
    " ORDER BY t.table_name"
)


# The foreign keys between Ays's tables: MariaDB will not convert a column one of them
# uses, foreign_key_checks or not, so they are dropped around the conversion and made again.
FOREIGN_KEYS = sa.text(
    "SELECT rc.constraint_name, rc.table_name, rc.referenced_table_name, rc.update_rule,"
    " rc.delete_rule, GROUP_CONCAT(k.column_name ORDER BY k.ordinal_position),"
    " GROUP_CONCAT(k.referenced_column_name ORDER BY k.ordinal_position)"
    " FROM information_schema.referential_constraints rc"
    " JOIN information_schema.key_column_usage k ON k.constraint_schema = rc.constraint_schema"
    " AND k.table_name = rc.table_name AND k.constraint_name = rc.constraint_name"
    " WHERE rc.constraint_schema = DATABASE() AND rc.table_name LIKE 'ays\\_%'"
    " GROUP BY rc.constraint_name, rc.table_name, rc.referenced_table_name, rc.update_rule,"
    " rc.delete_rule ORDER BY rc.table_name, rc.constraint_name"
)
DEFAULT_RULES = ("RESTRICT", "NO ACTION")
# The TEXT columns: CONVERT TO widens them to MEDIUMTEXT (room for as many characters at up
# to 4 bytes each); they are made TEXT again, as the models declare, when every value fits.
TEXT_COLUMNS = sa.text(
    "SELECT table_name, column_name, is_nullable FROM information_schema.columns"
    " WHERE table_schema = DATABASE() AND table_name LIKE 'ays\\_%' AND data_type = 'text'"
)
TEXT_BYTES = 65_535


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name not in ("mysql", "mariadb"):
        return
    tables = bind.execute(NOT_UTF8MB4_BIN).scalars().all()
    if not tables:
        return
    keys = bind.execute(FOREIGN_KEYS).all()
    texts = [row for row in bind.execute(TEXT_COLUMNS).all() if row[0] in tables]
    for name, table, *_ in keys:
        op.drop_constraint(name, table, type_="foreignkey")
    for table in tables:
        op.execute(f"ALTER TABLE `{table}` CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    for name, table, referenced, on_update, on_delete, columns, referenced_columns in keys:
        op.create_foreign_key(
            name,
            table,
            referenced,
            columns.split(","),
            referenced_columns.split(","),
            onupdate=None if on_update in DEFAULT_RULES else on_update,
            ondelete=None if on_delete in DEFAULT_RULES else on_delete,
        )
    for table, column, nullable in texts:
        longest = bind.execute(
            sa.text(f"SELECT COALESCE(MAX(LENGTH(`{column}`)), 0) FROM `{table}`")
        ).scalar()
        if int(longest or 0) <= TEXT_BYTES:
            null = "NULL" if nullable == "YES" else "NOT NULL"
            op.execute(
                f"ALTER TABLE `{table}` MODIFY `{column}` TEXT"
                f" CHARACTER SET utf8mb4 COLLATE utf8mb4_bin {null}"
            )


def downgrade() -> None:
    pass  # nothing to undo: utf8mb4_bin is what every revision declares
