"""`aysManager`: the scheduling center's commands.

Commands that talk to a running manager (`task`, `run`, `apply`, `export`, `node`, `logs`,
`reconcile`) go through its HTTP API (`ays_installer.api_client`), never to the database.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

import typer

from ays_installer import (
    alerts_cli,
    apply_cli,
    audit_cli,
    run_cli,
    task_cli,
    users_cli,
    workflow_cli,
)
from ays_installer.api_client import JsonOption, UrlOption
from ays_installer.options import (
    ConfigOption,
    DebugLoggerOption,
    EnvOption,
    IpOption,
    PortOption,
    RootOption,
    choose_config,
    clean_errors,
    fail,
    parse_ip,
    parse_port,
)
from ays_installer.service_cli import add_service_commands
from ays_installer.tables import local_time, print_table
from ays_installer.version import add_version_option
from ays_runtime.config import EnvConfig, check_ip, check_port

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help and one-line errors, as all three programs
    help="Ays scheduling center: run it, and manage its tasks and runs.",
)
add_version_option(app, "aysManager")
app.add_typer(task_cli.app, name="task")
app.add_typer(run_cli.app, name="run")
app.add_typer(workflow_cli.app, name="workflow")
app.add_typer(alerts_cli.app, name="alerts")
app.command("audit")(audit_cli.audit)
app.add_typer(users_cli.user_app, name="user")
app.add_typer(users_cli.token_app, name="token")
db_app = typer.Typer(no_args_is_help=True, help="Manage the database schema.")


@db_app.command("upgrade")
@clean_errors
def db_upgrade(env: EnvOption = None, config: ConfigOption = None, root: RootOption = None) -> None:
    """Apply the database migrations (the manager also does this at start)."""
    from ays_runtime.service.layout import service_umask
    from ays_runtime.storage.database import redacted
    from ays_runtime.storage.migrate import upgrade

    cfg = choose_config(env, config, root)
    service_umask()  # a new SQLite file gets the service's mode
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
    root: RootOption = None,
    ip: IpOption = None,
    port: PortOption = None,
    debug_logger: DebugLoggerOption = None,
) -> None:
    """Run the manager in the foreground, logging debug.

    Ctrl-C stops it cleanly."""
    from ays_runtime.logs import configure_logging
    from ays_runtime.manager.service import run_manager
    from ays_runtime.service.layout import service_umask

    cfg = with_address(choose_config(env, config, root), ip, port)
    service_umask()
    configure_logging(debug=True, debug_loggers=debug_logger or ())
    run_manager(cfg)


@app.command()
@clean_errors
def reconcile(
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print what the next reconcile would do, reading the database (the manager "
            "need not run), and change nothing.",
        ),
    ] = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
    ip: Annotated[
        str | None,
        typer.Option(
            "-p",
            "--ip",
            parser=parse_ip,
            metavar="IP",
            help="With --dry-run: the address of the manager whose timers are compared.",
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            "-P",
            "--port",
            parser=parse_port,
            metavar="PORT",
            help="With --dry-run: the port of that manager.",
        ),
    ] = None,
) -> None:
    """Reconcile the timer list now and print what it did.

    The running manager compares its timers with the tasks and prints each action it took;
    it also does so by itself every few seconds and after every change."""
    if not dry_run:
        if ip is not None or port is not None:
            raise fail("error: -p/-P name the manager of a --dry-run; a reconcile uses --url")
        with task_cli.connect(env, config, root, url) as api:
            done = api.post("/reconcile")
        for action in done["actions"]:
            typer.echo(action)
        typer.echo(f"manager {done['manager_id']}: {len(done['actions'])} action(s) done")
        return
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from ays_runtime.exceptions import StorageError
    from ays_runtime.scheduler.reconcile import Reconciler
    from ays_runtime.storage.database import make_engine, redacted, utcnow
    from ays_runtime.storage.migrate import current_revision
    from ays_runtime.storage.models import TimerRow

    cfg = with_address(choose_config(env, config, root), ip, port)
    manager_id = f"{cfg.manager.ip}:{cfg.manager.port}"
    url = cfg.storage_url()
    # One line naming the database and the fix when it cannot be reached or is not migrated.
    if current_revision(url) is None:
        raise StorageError(
            f"database {redacted(url)} has no Ays schema yet: run aysManager db upgrade "
            "(or start the manager, which migrates it)"
        )
    engine = make_engine(url)
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
        horizon = timedelta(seconds=cfg.manager.ledger_horizon)
        reconciler = Reconciler(engine, manager_id, cfg.manager.misfire_grace, horizon)
        plan = reconciler.plan(memory, utcnow())
    except SQLAlchemyError as err:
        raise StorageError(
            f"database {redacted(url)}: reading the tasks and timers failed: "
            f"{getattr(err, 'orig', None) or err}"
        ) from None
    finally:
        engine.dispose()
    for action in plan.actions:
        typer.echo(str(action))
    typer.echo(f"manager {manager_id}: {len(plan.actions)} action(s); nothing was changed")


node_app = typer.Typer(no_args_is_help=True, help="Manage the executor nodes the manager knows.")


@node_app.command("add")
@clean_errors
def node_add(
    group: Annotated[
        str, typer.Option("-g", "--group", metavar="GROUP", help="The node group it joins.")
    ],
    node_ip: Annotated[str, typer.Option("--node-ip", metavar="IP", help="The node's address.")],
    node_port: Annotated[int, typer.Option("--node-port", metavar="PORT", help="The node's port.")],
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Add a node by hand (it is used once it reports healthy)."""
    try:
        check_ip(node_ip)
        check_port(node_port)
    except ValueError as err:
        raise fail(f"error: {err}") from None
    with task_cli.connect(env, config, root, url) as api:
        node = api.post("/nodes", json={"ip": node_ip, "port": node_port, "node_group": group})
    if node.get("group_created"):
        typer.echo(f"created node group {group}")
    typer.echo(f"added node {node['id']}: {node_ip}:{node_port} in group {group}")


@node_app.command("list")
@clean_errors
def node_list(
    group: Annotated[
        str | None, typer.Option("-g", "--group", metavar="GROUP", help="Only this group's.")
    ] = None,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """List the nodes with their group, status, running jobs and last heartbeat."""
    params = {"node_group": group} if group else {}
    with task_cli.connect(env, config, root, url) as api:
        items = api.get("/nodes", params={**params, "limit": 1000})["items"]
    if as_json:
        task_cli.print_json(items)
        return
    print_table(
        ["ID", "ADDRESS", "GROUP", "STATUS", "SOURCE", "JOBS", "VERSION", "LAST SEEN"],
        [
            [
                n["id"],
                n["address"],
                n["node_group"],
                n["status"],
                n["source"],
                n["running_jobs"],
                n["version"] or None,
                local_time(n["last_seen"]),
            ]
            for n in items
        ],
        flexible=["GROUP", "VERSION"],
    )


@node_app.command("remove")
@clean_errors
def node_remove(
    node_id: Annotated[int, typer.Argument(metavar="ID", help="The node's id (see: node list).")],
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Remove a node from the manager's list."""
    with task_cli.connect(env, config, root, url) as api:
        api.call("DELETE", f"/nodes/{node_id}")
    typer.echo(f"removed node {node_id}")


@app.command()
@clean_errors
def logs(
    task: Annotated[
        str | None, typer.Option("--task", metavar="TASK", help="Only this task's runs.")
    ] = None,
    follow: Annotated[
        bool,
        typer.Option("-f", "--follow", help="Keep printing runs as they finish (Ctrl-C stops)."),
    ] = False,
    limit: Annotated[
        int, typer.Option("-n", metavar="N", min=1, max=1000, help="How many recent runs.")
    ] = 20,
    since: Annotated[
        datetime | None,
        typer.Option(
            "--since",
            metavar="TIME",
            formats=["%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"],
            help="Only runs created at or after this time (UTC), e.g. 2026-11-25T10:00:00.",
        ),
    ] = None,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Print recent finished runs, one line each.

    Oldest first; --follow keeps printing runs as they finish. A line gives the run's ids,
    slot, attempt and node, its status and exit code, then the run's message after
    "message:" and the start of its output after "output:"."""
    import time

    params: dict[str, object] = {"limit": limit}
    if since is not None:
        params["since"] = since.isoformat()
    printed: set[int] = set()
    with task_cli.connect(env, config, root, url) as api:
        if task is not None:
            params["task_id"] = task_cli.find_task(api, task)["id"]
        try:
            while True:
                page = api.get("/job-logs", params=params)
                for run in sorted(page["items"], key=lambda r: r["id"]):
                    if run["id"] in printed or run["status"] in (
                        "pending",
                        "dispatched",
                        "running",
                    ):
                        continue
                    printed.add(run["id"])
                    typer.echo(run_line(run))
                if not follow:
                    return
                time.sleep(1)
        except KeyboardInterrupt:  # the way to end --follow: no traceback
            return


def run_line(run: dict[str, Any]) -> str:
    """One finished run as `logs` prints it."""
    exit_code = "-" if run["exit_code"] is None else run["exit_code"]
    line = (
        f"run {run['id']:>6} task {run['task_id']} slot {run['scheduled_at']} "
        f"attempt {run['attempt']} on {run['node'] or '-'}: {run['status']} exit={exit_code}"
    )
    if run["message"]:
        line += f"; message: {run['message']}"
    output = run["output"].strip().replace("\n", " | ")
    if output:
        line += f"; output: {output[:120]}"
    return line


add_service_commands(app, "manager")  # install, serve, start|stop|status|restart|reload
apply_cli.add_commands(app)  # apply, export
app.add_typer(node_app, name="node")
app.add_typer(db_app, name="db")
