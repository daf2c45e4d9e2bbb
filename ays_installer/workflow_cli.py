"""`aysManager workflow ...`: workflows (ays_runtime.workflows) through the manager's API.

workflow list                       every workflow, with its latest run's status
workflow show NAME                  its tasks as layers, each task's state in the latest
                                    run (where it ran), and its latest runs
workflow add NAME --task T ...      create one (-s CRON, --params, --timeout)
workflow start NAME [--params P]    start it now; --wait waits for the run's end
workflow rerun RUN                  rerun a failed run from its failed tasks on
workflow delete NAME                delete it (its tasks stay)
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from ays_installer.api_client import JsonOption, UrlOption
from ays_installer.options import ConfigOption, EnvOption, RootOption
from ays_installer.tables import fields, local_time, print_table
from ays_installer.task_cli import connect, print_json

app = typer.Typer(no_args_is_help=True, help="Workflows: named sets of tasks run together.")

Name = Annotated[str, typer.Argument(metavar="NAME", help="The workflow's name.")]
RunId = Annotated[int, typer.Argument(metavar="RUN", help="The workflow run's id.")]
EXIT_RUN_FAILED = 1
WAIT_LIMIT_S = 24 * 3600


@app.command("list")
def list_workflows(
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Every workflow, its schedule and its latest run."""
    with connect(env, config, root, url) as api:
        items = api.get("/workflows")
        views = [api.get(f"/workflows/{wf['name']}") for wf in items]
    if as_json:
        print_json(views)
        return
    rows = []
    for v in views:
        wf, latest = v["workflow"], v["latest_run"]
        rows.append(
            [
                wf["name"],
                len(wf["tasks"]),
                wf["schedule"] or "by hand",
                wf["enabled"],
                f"{latest['status']} (run {latest['id']})" if latest else "never run",
            ]
        )
    print_table(["NAME", "TASKS", "SCHEDULE", "ENABLED", "LATEST RUN"], rows, ["NAME"])


@app.command("show")
def show_workflow(
    name: Name,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """A workflow, each task's state in its latest run (and where it ran), its runs."""
    with connect(env, config, root, url) as api:
        view = api.get(f"/workflows/{name}")
    if as_json:
        print_json(view)
        return
    wf, latest = view["workflow"], view["latest_run"]
    fields(
        [
            ("name", wf["name"]),
            ("description", wf["description"]),
            ("schedule", f"{wf['schedule']} ({wf['timezone']})" if wf["schedule"] else "by hand"),
            ("params", wf["params"]),
            ("timeout", f"{wf['timeout_s']}s" if wf["timeout_s"] else "none"),
            ("enabled", wf["enabled"]),
            ("tasks", ", ".join(wf["tasks"])),
        ]
    )
    if latest:
        typer.echo(f"\nlatest run {latest['id']}: {latest['status']} {latest['message']}".rstrip())
        _nodes(latest)
    if view["runs"]:
        typer.echo("\nruns:")
        print_table(
            ["RUN", "SLOT", "TRIGGER", "STATUS", "ENDED"],
            [
                [
                    r["id"],
                    local_time(r["scheduled_at"]),
                    r["trigger"],
                    r["status"],
                    local_time(r["ended_at"]),
                ]
                for r in view["runs"]
            ],
        )


def _nodes(run: dict[str, Any]) -> None:
    print_table(
        ["DEPTH", "TASK", "AFTER", "STATUS", "ATTEMPT", "NODE", "RUN"],
        [
            [
                n["depth"],
                n["task"],
                ", ".join(n["parents"]) or "-",
                n["status"],
                n["attempt"],
                n["node"] or "-",
                n["job_log_id"],
            ]
            for n in run["nodes"]
        ],
        ["TASK"],
    )


@app.command("add")
def add_workflow(
    name: Name,
    task: Annotated[
        list[str],
        typer.Option("--task", "-t", metavar="TASK", help="A task of it (repeat for each)."),
    ],
    schedule: Annotated[
        str, typer.Option("-s", "--schedule", help="Cron that starts it (default: by hand).")
    ] = "",
    timezone: Annotated[str, typer.Option("--timezone", help="The schedule's time zone.")] = "UTC",
    params: Annotated[str, typer.Option("--params", help="Handed to every task.")] = "",
    timeout: Annotated[
        int, typer.Option("--timeout", help="Seconds a run may take (0: no limit).")
    ] = 0,
    description: Annotated[str, typer.Option("--description", help="Free text.")] = "",
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Create a workflow of existing tasks (their --after are its edges)."""
    body = {
        "name": name,
        "tasks": task,
        "schedule": schedule,
        "timezone": timezone,
        "params": params,
        "timeout_s": timeout,
        "description": description,
    }
    with connect(env, config, root, url) as api:
        wf = api.post("/workflows", json=body)
    if as_json:
        print_json(wf)
        return
    typer.echo(f"created workflow {wf['name']!r} of {len(wf['tasks'])} task(s)")


@app.command("start")
def start_workflow(
    name: Name,
    params: Annotated[
        str | None, typer.Option("--params", help="Replace the workflow's params this run.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the run's end.")] = False,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Start a workflow now; with --wait, exit 1 unless it succeeded."""
    body = {} if params is None else {"params": params}
    with connect(env, config, root, url) as api:
        run = api.post(f"/workflows/{name}/start", json=body)
        if wait:
            deadline = time.monotonic() + WAIT_LIMIT_S
            while run["status"] == "running" and time.monotonic() < deadline:
                time.sleep(1.0)
                run = api.get(f"/workflow-runs/{run['id']}")
    if as_json:
        print_json(run)
    else:
        typer.echo(f"workflow {name!r}: run {run['id']} {run['status']}")
        if wait:
            _nodes(run)
    if wait and run["status"] != "succeeded":
        raise typer.Exit(EXIT_RUN_FAILED)


@app.command("rerun")
def rerun_workflow(
    run_id: RunId,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Rerun a failed workflow run from its failed tasks on (same run, same slot)."""
    with connect(env, config, root, url) as api:
        run = api.post(f"/workflow-runs/{run_id}/rerun")
    if as_json:
        print_json(run)
        return
    typer.echo(f"workflow run {run['id']}: {run['message']}")


@app.command("delete")
def delete_workflow(
    name: Name,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Delete a workflow (its tasks and its runs' job logs stay)."""
    with connect(env, config, root, url) as api:
        response = api.answer("DELETE", f"/workflows/{name}")
        if not response.is_success:
            raise api.refused(response)
    typer.echo(f"deleted workflow {name!r}")
