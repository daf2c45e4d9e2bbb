"""`aysManager`: the scheduling center's commands."""

from __future__ import annotations

import typer

from ays_installer.options import ConfigOption, EnvOption, choose_config, clean_errors

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Ays scheduling center.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
@clean_errors
def db_upgrade(env: EnvOption = None, config: ConfigOption = None) -> None:
    """Apply the database migrations (the manager also does this at start)."""
    from ays_runtime.storage.database import redacted
    from ays_runtime.storage.migrate import upgrade

    cfg = choose_config(env, config)
    url = cfg.storage_url()
    upgrade(url)
    typer.echo(f"database {redacted(url)}: schema is at the latest revision")
