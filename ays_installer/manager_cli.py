"""`aysManager`: the scheduling center's commands."""

from __future__ import annotations

from typing import Annotated

import typer

from ays_installer.options import (
    EXIT_FAILURE,
    ConfigOption,
    EnvOption,
    IpOption,
    PortOption,
    choose_config,
    clean_errors,
    fail,
)
from ays_installer.service_cli import add_service_commands
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


def with_address(cfg: EnvConfig, ip: str | None, port: int | None) -> EnvConfig:
    """The config with the manager's -p/-P (already checked by their parsers) applied."""
    updates = {k: v for k, v in {"ip": ip, "port": port}.items() if v is not None}
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


node_app = typer.Typer(no_args_is_help=True, help="Executor nodes known to the manager.")
app.add_typer(node_app, name="node")


def _manager_api(cfg: EnvConfig):  # noqa: ANN202 - an httpx.Client
    """A client for the running manager's API, with the env's access token."""
    import httpx

    from ays_runtime.auth import auth_headers, resolve_access_token

    token = resolve_access_token(cfg, generate=False)
    host = f"[{cfg.manager.ip}]" if ":" in cfg.manager.ip else cfg.manager.ip
    return httpx.Client(
        base_url=f"http://{host}:{cfg.manager.port}/api/v1", headers=auth_headers(token), timeout=10
    )


def _call(cfg: EnvConfig, method: str, path: str, **kwargs: object) -> object:
    import httpx

    try:
        with _manager_api(cfg) as api:
            response = api.request(method, path, **kwargs)
    except httpx.HTTPError as err:
        raise fail(
            f"error: cannot reach the manager at {cfg.manager.ip}:{cfg.manager.port} ({err}); "
            "is it running? (aysManager status)",
            EXIT_FAILURE,
        ) from None
    if response.status_code >= 400:
        try:
            message = response.json().get("error") or response.json().get("detail")
        except ValueError:
            message = response.text
        raise fail(f"error: manager answered {response.status_code}: {message}")
    return response.json() if response.content else None


@node_app.command("add")
@clean_errors
def node_add(
    group: Annotated[str, typer.Option("-g", "--group", help="node group the node joins")],
    node_ip: Annotated[str, typer.Option("--node-ip", help="the node's address")],
    node_port: Annotated[int, typer.Option("--node-port", help="the node's port")],
    env: EnvOption = None,
    config: ConfigOption = None,
) -> None:
    """Add a node by hand (it is used once it reports healthy)."""
    cfg = choose_config(env, config)
    try:
        check_ip(node_ip)
        check_port(node_port)
    except ValueError as err:
        raise fail(f"error: {err}") from None
    node = _call(
        cfg, "POST", "/nodes", json={"ip": node_ip, "port": node_port, "node_group": group}
    )
    typer.echo(f"added node {node['id']}: {node_ip}:{node_port} in group {group}")  # type: ignore[index]


@node_app.command("list")
@clean_errors
def node_list(
    group: Annotated[str | None, typer.Option("-g", "--group")] = None,
    env: EnvOption = None,
    config: ConfigOption = None,
) -> None:
    """List the nodes with their group, status and last heartbeat."""
    cfg = choose_config(env, config)
    params = {"node_group": group} if group else {}
    body = _call(cfg, "GET", "/nodes", params=params)
    items = body["items"] if isinstance(body, dict) else body
    typer.echo(f"{'ID':>4}  {'ADDRESS':<22} {'GROUP':<16} {'STATUS':<8} {'SOURCE':<7} LAST SEEN")
    for n in items:  # type: ignore[union-attr]
        typer.echo(
            f"{n['id']:>4}  {n['ip'] + ':' + str(n['port']):<22} {n['node_group']:<16} "
            f"{n['status']:<8} {n['source']:<7} {n.get('last_seen') or '-'}"
        )


@node_app.command("remove")
@clean_errors
def node_remove(
    node_id: Annotated[int, typer.Argument(help="the node's id (see: node list)")],
    env: EnvOption = None,
    config: ConfigOption = None,
) -> None:
    """Remove a node from the manager's list."""
    cfg = choose_config(env, config)
    _call(cfg, "DELETE", f"/nodes/{node_id}")
    typer.echo(f"removed node {node_id}")


@app.command()
@clean_errors
def logs(
    task: Annotated[int | None, typer.Option("--task", help="only this task id")] = None,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="keep printing new runs")] = False,
    limit: Annotated[int, typer.Option("-n", help="how many recent runs")] = 20,
    env: EnvOption = None,
    config: ConfigOption = None,
) -> None:
    """Print recent finished runs (job logs), oldest first; --follow keeps going."""
    import time

    cfg = choose_config(env, config)
    params: dict[str, object] = {"limit": limit}
    if task is not None:
        params["task_id"] = task
    printed: set[int] = set()
    while True:
        page = _call(cfg, "GET", "/job-logs", params=params)
        for run in sorted(page["items"], key=lambda r: r["id"]):  # type: ignore[index]
            if run["id"] in printed or run["status"] in ("pending", "dispatched", "running"):
                continue
            printed.add(run["id"])
            output = run["output"].strip().replace("\n", " | ")
            typer.echo(
                f"run {run['id']:>6} task {run['task_id']} slot {run['scheduled_at']} "
                f"attempt {run['attempt']} on {run['node'] or '-'}: {run['status']}"
                f" exit={run['exit_code']} {run['message']} {output[:120]}".rstrip()
            )
        if not follow:
            return
        time.sleep(1)


add_service_commands(app, "manager")  # install, serve, start|stop|status|restart|reload
