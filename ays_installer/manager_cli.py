"""`aysManager`: the scheduling center's commands."""

from __future__ import annotations

from typing import Annotated

import typer

from ays_installer.options import ConfigOption, EnvOption, choose_config, clean_errors, fail
from ays_runtime.config import EnvConfig, check_ip, check_port

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


IpOption = Annotated[str | None, typer.Option("-p", "--ip", help="address to listen on")]
PortOption = Annotated[int | None, typer.Option("-P", "--port", help="port to listen on")]


def with_address(cfg: EnvConfig, ip: str | None, port: int | None) -> EnvConfig:
    """The config with the manager's -p/-P applied, each checked and named when wrong."""
    updates: dict[str, object] = {}
    if ip is not None:
        try:
            updates["ip"] = check_ip(ip)
        except ValueError as err:
            raise fail(f"error: -p/--ip: {err}") from None
    if port is not None:
        try:
            updates["port"] = check_port(port)
        except ValueError as err:
            raise fail(f"error: -P/--port: {err}") from None
    if not updates:
        return cfg
    return cfg.model_copy(update={"manager": cfg.manager.model_copy(update=updates)})


@app.command()
@clean_errors
def debug(
    env: EnvOption = None,
    config: ConfigOption = None,
    ip: IpOption = None,
    port: PortOption = None,
) -> None:
    """Run the manager in the foreground with debug logging (Ctrl-C stops it cleanly)."""
    from ays_runtime.logs import configure_logging
    from ays_runtime.manager.service import run_manager

    cfg = with_address(choose_config(env, config), ip, port)
    configure_logging(debug=True)
    run_manager(cfg)


@app.command()
@clean_errors
def reconcile(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the actions, change nothing")
    ] = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    ip: IpOption = None,
    port: PortOption = None,
) -> None:
    """Show what the next reconcile of this manager's timer list would do, one line each."""
    from sqlalchemy import select

    from ays_runtime.scheduler.reconcile import Reconciler
    from ays_runtime.storage.database import make_engine, utcnow
    from ays_runtime.storage.models import TimerRow

    if not dry_run:
        raise fail("error: only --dry-run is supported: a running manager reconciles by itself")
    cfg = with_address(choose_config(env, config), ip, port)
    manager_id = f"{cfg.manager.ip}:{cfg.manager.port}"
    engine = make_engine(cfg.storage_url())
    try:
        with engine.connect() as conn:
            # The running manager's memory matches its rows unless they drift; the dry run
            # shows what it would do about the tasks.
            memory = {
                r.task_id: r.version
                for r in conn.execute(
                    select(TimerRow.task_id, TimerRow.version).where(
                        TimerRow.manager_id == manager_id
                    )
                )
            }
        plan = Reconciler(engine, manager_id, cfg.manager.misfire_grace).plan(memory, utcnow())
    finally:
        engine.dispose()
    for action in plan.actions:
        typer.echo(str(action))
    typer.echo(f"manager {manager_id}: {len(plan.actions)} action(s); nothing was changed")
