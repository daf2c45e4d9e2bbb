"""Alembic environment for Ays. Run through `ays_runtime.storage.migrate`, which passes the
connection to migrate in `config.attributes["connection"]` (online mode); offline (`--sql`)
mode renders SQL for the dialect of the URL in the main option `sqlalchemy.url`."""

from __future__ import annotations

from alembic import context

from ays_runtime.storage.models import Base

# Only autogenerate comparisons (tests, new revisions) read the models; the migrations
# themselves spell every table out, as the schema was at their revision.
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "Ays migrations run through ays_runtime.storage.migrate.upgrade(url) "
            "(or `aysManager db upgrade`), which supplies the connection"
        )
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
