"""`aysManager task ...`: tasks through the manager's API.

    task list | show | add | edit | enable | disable | trigger | delete | history | rollback

A task is named by its name (or its id). Exit codes: see `ays_installer.api_client`;
`trigger --wait` exits with the run's own (see `ays_installer.run_cli.run_exit_code`).
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any

import typer

from ays_installer.api_client import (
    EXIT_NOT_FOUND,
    JsonOption,
    ManagerApi,
    UrlOption,
    find_target,
)
from ays_installer.options import ConfigOption, EnvOption, RootOption, fail
from ays_installer.tables import fields, local_time, print_table
from ays_runtime.vocabulary import (
    AfterCondition,
    AfterMode,
    BlockStrategy,
    MisfirePolicy,
    RetryBackoff,
    RouteStrategy,
)

app = typer.Typer(
    no_args_is_help=True,
    help="Create, change, run and inspect tasks.",
)

TaskRef = Annotated[str, typer.Argument(metavar="TASK", help="The task's name (or id).")]

# The definition's options, shared by add and edit (edit changes only those given).
Description = Annotated[
    str | None, typer.Option("--description", metavar="TEXT", help="Free text about the task.")
]
Group = Annotated[
    str | None,
    typer.Option("-g", "--group", metavar="GROUP", help="The node group whose nodes run it."),
]
Schedule = Annotated[
    str | None,
    typer.Option(
        "-s",
        "--schedule",
        metavar="CRON",
        help="When it runs: 6-field cron with seconds first ('0 30 2 * * *'), 5-field cron, "
        "'@every 10s', or @hourly, @daily, @weekly, @monthly, @yearly.",
    ),
]
Timezone = Annotated[
    str | None,
    typer.Option(
        "--timezone", metavar="ZONE", help="The IANA time zone of the schedule (default: UTC)."
    ),
]
Command = Annotated[
    str | None,
    typer.Option("-c", "--command", metavar="COMMAND", help="A shell task: this command line."),
]
JobEnv = Annotated[
    list[str] | None,
    typer.Option(
        "--job-env",
        metavar="NAME=VALUE",
        help="An environment variable of the shell command (repeat for more).",
    ),
]
Workdir = Annotated[
    str | None,
    typer.Option("--workdir", metavar="DIR", help="The directory the shell command runs in."),
]
HttpUrl = Annotated[
    str | None, typer.Option("--http-url", metavar="URL", help="An HTTP task: call this URL.")
]
HttpMethod = Annotated[
    str | None,
    typer.Option("--http-method", metavar="METHOD", help="The HTTP method (default: GET)."),
]
HttpHeader = Annotated[
    list[str] | None,
    typer.Option(
        "--http-header",
        metavar="'NAME: VALUE'",
        help="A header of the HTTP call (repeat for more).",
    ),
]
HttpBody = Annotated[
    str | None, typer.Option("--http-body", metavar="TEXT", help="The body of the HTTP call.")
]
ExpectedStatus = Annotated[
    int | None,
    typer.Option(
        "--expected-status",
        metavar="CODE",
        help="The HTTP status that means success (default: any 2xx).",
    ),
]
Params = Annotated[
    str | None,
    typer.Option(
        "--params", metavar="TEXT", help="Handed to every run (its environment's AYS_PARAMS)."
    ),
]
Timeout = Annotated[
    int | None,
    typer.Option("--timeout", metavar="SECONDS", help="How long a run may take (0: no limit)."),
]
Retries = Annotated[
    int | None,
    typer.Option("--retries", metavar="N", help="How often a failed run is retried."),
]
Backoff = Annotated[
    RetryBackoff | None,
    typer.Option("--retry-backoff", help="How the wait between retries grows."),
]
RetryInterval = Annotated[
    float | None,
    typer.Option("--retry-interval", metavar="SECONDS", help="The wait before the first retry."),
]
ConcurrentRetry = Annotated[
    bool | None,
    typer.Option(
        "--allow-concurrent-retry/--no-allow-concurrent-retry",
        help="Retry a run whose node was lost at once, though its old process may still run "
        "there (default: the retry waits until the node reports the run ended, or until its "
        "timeout has passed).",
    ),
]
Route = Annotated[
    RouteStrategy | None,
    typer.Option("--route", help="Which node(s) of the group run a fire."),
]
Block = Annotated[
    BlockStrategy | None,
    typer.Option("--block", help="What a node does when the previous run still goes on."),
]
Misfire = Annotated[
    MisfirePolicy | None,
    typer.Option("--misfire", help="What happens to fires missed while no manager ran."),
]
Tags = Annotated[
    list[str] | None,
    typer.Option(
        "--tag",
        metavar="TAG",
        help="A label to find the task by (task list --tag): 1-32 of a-z 0-9 _ . - (repeat, "
        "or a,b, for more). On edit, the task's tags become those given.",
    ),
]
After = Annotated[
    list[str] | None,
    typer.Option(
        "--after",
        metavar="PARENT[:CONDITION]",
        help="Fire when the run of task PARENT ends; CONDITION is success (default), failure "
        "or always (repeat for more parents). On edit, the task's parents become those given.",
    ),
]
AfterModeOption = Annotated[
    AfterMode | None,
    typer.Option(
        "--after-mode",
        help="With several parents: all = once per slot when every parent's run met its "
        "condition (default); any = once per parent run that met it.",
    ),
]
NoAfter = Annotated[
    bool, typer.Option("--no-after", help="Take every parent off the task.", show_default=False)
]
NoTags = Annotated[
    bool, typer.Option("--no-tags", help="Take every tag off the task.", show_default=False)
]
Enabled = Annotated[
    bool | None,
    typer.Option(
        "--enabled/--disabled", help="Whether it fires on its schedule (default: enabled)."
    ),
]


def connect(env: str | None, config: Any, root: Any, url: str | None) -> ManagerApi:
    return ManagerApi(find_target(env, config, root, url))


def find_task(api: ManagerApi, ref: str) -> dict[str, Any]:
    """The task named `ref` (or, when no task has that name, numbered `ref`); exit 3 when
    there is none."""
    task = lookup_task(api, ref)
    if task is None:
        raise fail(f"error: no task is named {ref!r} (see: aysManager task list)", EXIT_NOT_FOUND)
    return task


def lookup_task(api: ManagerApi, ref: str) -> dict[str, Any] | None:
    offset = 0
    while True:
        page = api.get("/tasks", params={"name": ref, "limit": 1000, "offset": offset})
        for task in page["items"]:
            if task["name"] == ref:
                return dict(task)
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            break
    if ref.isdigit():
        task = api.find(f"/tasks/{ref}")
        return dict(task) if task is not None else None
    return None


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def what_it_runs(task: dict[str, Any]) -> str:
    payload = task["payload"]
    if task["task_type"] == "http":
        return f"{payload.get('method', 'GET')} {payload.get('url', '')}"
    return str(payload.get("command", ""))


# --- reading ----------------------------------------------------------------------------------


@app.command("list")
def list_tasks(
    group: Annotated[
        str | None, typer.Option("-g", "--group", metavar="GROUP", help="Only this node group's.")
    ] = None,
    enabled: Annotated[
        bool | None,
        typer.Option("--enabled/--disabled", help="Only the enabled (or disabled) ones."),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", metavar="TEXT", help="Only names holding TEXT.")
    ] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option(
            "--tag", metavar="TAG", help="Only the tasks carrying TAG (repeat: every one given)."
        ),
    ] = None,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """List the tasks.

    Each with its id, name, group, schedule, type, state, version, tags and what it runs."""
    params: dict[str, Any] = {"limit": 1000, "tag": tag_list(tag)}
    for key, value in (("node_group", group), ("enabled", enabled), ("name", name)):
        if value is not None:
            params[key] = str(value).lower() if isinstance(value, bool) else value
    items: list[dict[str, Any]] = []
    with connect(env, config, root, url) as api:
        while True:
            page = api.get("/tasks", params={**params, "offset": len(items)})
            items += page["items"]
            if not page["items"] or len(items) >= page["total"]:
                break
    if as_json:
        print_json(items)
        return
    print_table(
        ["ID", "NAME", "GROUP", "SCHEDULE", "TYPE", "ENABLED", "VERSION", "TAGS", "RUNS"],
        [
            [
                t["id"],
                t["name"],
                t["node_group"],
                t["schedule"],
                t["task_type"],
                t["enabled"],
                t["version"],
                ",".join(t["tags"]),
                what_it_runs(t),
            ]
            for t in items
        ],
        flexible=["NAME", "SCHEDULE", "RUNS", "GROUP", "TAGS"],
    )


@app.command("show")
def show_task(
    task: TaskRef,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Show a task's whole definition and its latest runs."""
    with connect(env, config, root, url) as api:
        # by id: the single task's view also says what is wrong with its parents
        found = api.get(f"/tasks/{find_task(api, task)['id']}")
        runs = api.get("/job-logs", params={"task_id": found["id"], "limit": 5})["items"]
    if as_json:
        print_json(found)
        return
    fields(
        [
            ("id", found["id"]),
            ("name", found["name"]),
            ("description", found["description"]),
            ("node group", found["node_group"]),
            (
                "schedule",
                f"{found['schedule']} ({found['timezone']})" if found["schedule"] else "none",
            ),
            (
                "after",
                ", ".join(f"{e['task']}:{e['condition']}" for e in found.get("after") or [])
                + (f" (mode {found.get('after_mode')})" if found.get("after") else "none"),
            ),
            *(("  problem", p) for p in found.get("after_problems") or []),
            ("enabled", found["enabled"]),
            ("tags", ", ".join(found["tags"]) or "none"),
            ("type", found["task_type"]),
            *((f"  {k}", _value(v)) for k, v in found["payload"].items()),
            ("params", found["params"]),
            ("timeout", f"{found['timeout_s']}s" if found["timeout_s"] else "none"),
            (
                "retries",
                f"{found['retry_count']} ({found['retry_backoff']}, first after "
                f"{found['retry_interval_s']:g}s"
                + ("; a lost run's at once" if found.get("allow_concurrent_retry") else "")
                + ")",
            ),
            ("route", found["route_strategy"]),
            ("block", found["block_strategy"]),
            ("misfire", found["misfire_policy"]),
            ("version", found["version"]),
            ("created", local_time(found["created_at"])),
            ("updated", local_time(found["updated_at"])),
        ]
    )
    if runs:
        from ays_installer.run_cli import run_rows

        typer.echo("\nlatest runs:")
        run_rows(runs, {found["id"]: found["name"]})


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# --- changing ---------------------------------------------------------------------------------


def pairs(values: list[str] | None, separator: str, option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or ():
        key, sep, value = item.partition(separator)
        if not sep or not key.strip():
            shown = "NAME=VALUE" if separator == "=" else "'NAME: VALUE'"
            raise fail(f"error: {option} {item!r} is not {shown}")
        out[key.strip()] = value.strip() if separator == ":" else value
    return out


def parent_list(values: list[str] | None) -> list[dict[str, str]]:
    """The parents of `--after PARENT[:CONDITION]` options."""
    conditions = [c.value for c in AfterCondition]
    out = []
    for value in values or ():
        name, _, condition = value.rpartition(":") if ":" in value else (value, "", "success")
        condition = condition or "success"
        if not name.strip() or condition not in conditions:
            raise fail(
                f"error: --after {value!r} is not PARENT[:CONDITION] with CONDITION one of "
                f"{', '.join(conditions)}"
            )
        out.append({"task": name.strip(), "condition": condition})
    return out


def tag_list(values: list[str] | None) -> list[str]:
    """The tags of `--tag` options, each of which may hold several (a,b)."""
    return [tag.strip() for value in values or () for tag in value.split(",") if tag.strip()]


# Option (parameter name) -> the API's field, for the options that map one to one.
FIELD_OF_OPTION = {
    "description": "description",
    "group": "node_group",
    "schedule": "schedule",
    "timezone": "timezone",
    "params": "params",
    "timeout": "timeout_s",
    "retries": "retry_count",
    "retry_backoff": "retry_backoff",
    "retry_interval": "retry_interval_s",
    "allow_concurrent_retry": "allow_concurrent_retry",
    "route": "route_strategy",
    "block": "block_strategy",
    "misfire": "misfire_policy",
    "enabled": "enabled",
    "after_mode": "after_mode",
}


def definition_changes(current: dict[str, Any] | None, given: dict[str, Any]) -> dict[str, Any]:
    """The API fields the options `given` (the command's parameters) set; the payload merged
    into `current`'s (edit) when the task keeps its type."""
    changes: dict[str, Any] = {
        field: given[option].value if isinstance(given[option], Enum) else given[option]
        for option, field in FIELD_OF_OPTION.items()
        if given.get(option) is not None
    }
    if given.get("tag") and given.get("no_tags"):
        raise fail("error: give --tag TAG or --no-tags, not both")
    if given.get("tag"):
        changes["tags"] = tag_list(given["tag"])
    elif given.get("no_tags"):
        changes["tags"] = []
    if given.get("after") and given.get("no_after"):
        raise fail("error: give --after PARENT or --no-after, not both")
    if given.get("after"):
        changes["after"] = parent_list(given["after"])
    elif given.get("no_after"):
        changes["after"] = []
    command, job_env, workdir = given.get("command"), given.get("job_env"), given.get("workdir")
    http_url, http_header = given.get("http_url"), given.get("http_header")
    http_method, http_body = given.get("http_method"), given.get("http_body")
    expected_status = given.get("expected_status")
    shell = {
        key: value
        for key, value in {
            "command": command,
            "env": pairs(job_env, "=", "--job-env") if job_env else None,
            "workdir": workdir,
        }.items()
        if value is not None
    }
    http = {
        key: value
        for key, value in {
            "url": http_url,
            "method": http_method,
            "headers": pairs(http_header, ":", "--http-header") if http_header else None,
            "body": http_body,
            "expected_status": expected_status,
        }.items()
        if value is not None
    }
    if shell and http:
        raise fail("error: a task is a shell task or an HTTP task: give -c or --http-url, not both")
    article = {"shell": "a shell", "http": "an HTTP"}
    for kind, payload, leader in (("shell", shell, "command"), ("http", http, "url")):
        if not payload:
            continue
        if current is not None and current["task_type"] == kind:
            changes["payload"] = {**current["payload"], **payload}
        elif leader in payload:
            changes["task_type"] = kind
            changes["payload"] = payload
        else:
            flag = "-c COMMAND" if kind == "shell" else "--http-url URL"
            what = f"task {current['name']!r} is " if current else "this is not "
            other = article.get(current["task_type"], "another") if current else article[kind]
            raise fail(
                f"error: {what}{other} task: give {flag} too to make it {article[kind]} task"
            )
    return changes


@app.command("add")
def add_task(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The new task's unique name.")],
    group: Group = None,
    schedule: Schedule = None,
    command: Command = None,
    http_url: HttpUrl = None,
    description: Description = None,
    timezone: Timezone = None,
    job_env: JobEnv = None,
    workdir: Workdir = None,
    http_method: HttpMethod = None,
    http_header: HttpHeader = None,
    http_body: HttpBody = None,
    expected_status: ExpectedStatus = None,
    params: Params = None,
    timeout: Timeout = None,
    retries: Retries = None,
    retry_backoff: Backoff = None,
    retry_interval: RetryInterval = None,
    allow_concurrent_retry: ConcurrentRetry = None,
    route: Route = None,
    block: Block = None,
    misfire: Misfire = None,
    enabled: Enabled = None,
    tag: Tags = None,
    after: After = None,
    after_mode: AfterModeOption = None,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Create a task.

    It needs -g GROUP, -s CRON (or --after PARENT, or both; -s '' for a task run only by
    hand or by its workflow), and -c COMMAND (a shell task) or --http-url URL (an HTTP task);
    the other fields take their defaults unless given."""
    missing = [] if group else ["-g GROUP"]
    if schedule is None and not after:  # -s '' says: no schedule, on purpose
        missing.append("-s CRON (or -s '' for none), or --after PARENT")
    if not (command or http_url):
        missing.append("-c COMMAND (a shell task) or --http-url URL (an HTTP task)")
    if missing:
        raise fail(f"error: a new task needs {', '.join(missing)}")
    body = {
        "name": name,
        **definition_changes(None, ctx.params),
    }
    with connect(env, config, root, url) as api:
        task = api.post("/tasks", json=body)
    if as_json:
        print_json(task)
        return
    state = "" if task["enabled"] else " (disabled)"
    fires = f"{task['schedule']} {task['timezone']}" if task["schedule"] else ""
    if task.get("after"):
        parents = ", ".join(f"{e['task']}:{e['condition']}" for e in task["after"])
        fires += f"{' and ' if fires else ''}after {parents} ({task['after_mode']})"
    typer.echo(
        f"created task {task['name']!r} (id {task['id']}): {fires} "
        f"in node group {task['node_group']}{state}"
    )


@app.command("edit")
def edit_task(
    ctx: typer.Context,
    task: TaskRef,
    new_name: Annotated[
        str | None, typer.Option("--name", metavar="NAME", help="A new name for the task.")
    ] = None,
    group: Group = None,
    schedule: Schedule = None,
    command: Command = None,
    http_url: HttpUrl = None,
    description: Description = None,
    timezone: Timezone = None,
    job_env: JobEnv = None,
    workdir: Workdir = None,
    http_method: HttpMethod = None,
    http_header: HttpHeader = None,
    http_body: HttpBody = None,
    expected_status: ExpectedStatus = None,
    params: Params = None,
    timeout: Timeout = None,
    retries: Retries = None,
    retry_backoff: Backoff = None,
    retry_interval: RetryInterval = None,
    allow_concurrent_retry: ConcurrentRetry = None,
    route: Route = None,
    block: Block = None,
    misfire: Misfire = None,
    enabled: Enabled = None,
    tag: Tags = None,
    no_tags: NoTags = False,
    after: After = None,
    after_mode: AfterModeOption = None,
    no_after: NoAfter = False,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Change a task's fields.

    The fields given change, the others keep their values; the task gets a new version."""
    with connect(env, config, root, url) as api:
        current = find_task(api, task)
        changes = definition_changes(current, ctx.params)
        if new_name is not None:
            changes["name"] = new_name
        if not changes:
            raise fail("error: nothing to change: give the fields to change (see --help)")
        updated = api.call("PATCH", f"/tasks/{current['id']}", json=changes)
    if as_json:
        print_json(updated)
    elif updated["version"] == current["version"]:
        typer.echo(f"task {updated['name']!r} already had these values; nothing changed")
    else:
        changed = [k for k in TASK_FIELDS if current.get(k) != updated.get(k)]
        typer.echo(
            f"task {updated['name']!r} is now at version {updated['version']} "
            f"(changed: {', '.join(changed)})"
        )


TASK_FIELDS = (
    "name",
    "description",
    "node_group",
    "schedule",
    "timezone",
    "task_type",
    "payload",
    "params",
    "timeout_s",
    "retry_count",
    "retry_backoff",
    "retry_interval_s",
    "allow_concurrent_retry",
    "route_strategy",
    "block_strategy",
    "misfire_policy",
    "enabled",
    "tags",
)


def _switch(task: str, on: bool, env: Any, config: Any, root: Any, url: str | None) -> None:
    with connect(env, config, root, url) as api:
        found = find_task(api, task)
        action = "enable" if on else "disable"
        updated = api.post(f"/tasks/{found['id']}/{action}")
    if updated["version"] == found["version"]:
        typer.echo(f"task {found['name']!r} was {action}d already")
    else:
        typer.echo(f"task {found['name']!r} {action}d (version {updated['version']})")


@app.command("enable")
def enable_task(
    task: TaskRef,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Let the task fire on its schedule again."""
    _switch(task, True, env, config, root, url)


@app.command("disable")
def disable_task(
    task: TaskRef,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Stop the task firing on its schedule.

    Runs going on are not stopped, and trigger still fires it."""
    _switch(task, False, env, config, root, url)


@app.command("delete")
def delete_task(
    task: TaskRef,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Delete a task.

    Its runs stay, and so does its history (task history NAME)."""
    with connect(env, config, root, url) as api:
        found = find_task(api, task)
        api.call("DELETE", f"/tasks/{found['id']}")
    typer.echo(f"deleted task {found['name']!r} (id {found['id']})")


@app.command("trigger")
def trigger_task(
    task: TaskRef,
    params: Annotated[
        str | None,
        typer.Option(
            "--params", metavar="TEXT", help="Replace the task's params for this run only."
        ),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Wait for the run (and its retries) to end, print its output and exit with "
            "its exit code.",
        ),
    ] = False,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Fire the task now, outside its schedule.

    A disabled task fires too. With --wait, the run's output goes to stdout, its progress
    to stderr, and the command exits with the run's exit code (see README); a broadcast
    waits for every node's shard and exits with the first shard's code that is not 0."""
    from ays_installer.run_cli import report_end, wait_for_run, wait_for_shards, worst_exit_code

    body = {"params": params} if params is not None else None
    with connect(env, config, root, url) as api:
        found = find_task(api, task)
        fired = api.post(f"/tasks/{found['id']}/trigger", json=body)
        run_id = fired["job_log_id"]
        if not wait:
            if as_json:
                print_json(fired)
            else:
                typer.echo(f"fired task {found['name']!r}: run {run_id}")
            return
        typer.echo(f"fired task {found['name']!r}: run {run_id}; waiting for it", err=True)
        run = wait_for_run(api, run_id)
        runs = [run, *wait_for_shards(api, run)]  # a broadcast: every node's shard
    if as_json:
        print_json(run if len(runs) == 1 else runs)
    else:
        for each in runs:
            report_end(each)
    raise typer.Exit(worst_exit_code(runs))


# --- history ----------------------------------------------------------------------------------


@app.command("history")
def task_history(
    task: TaskRef,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """List a task's versions, newest first.

    Each with when, who and through what (api, console, apply, rollback) it was made and
    the fields it changed. A deleted task's history is found by its name."""
    with connect(env, config, root, url) as api:
        found = lookup_task(api, task)
        if found is not None:
            rows = api.get(f"/tasks/{found['id']}/versions")["items"]
        else:
            rows = api.get("/task-versions", params={"name": task})["items"]
            if not rows:
                raise fail(
                    f"error: no task is named {task!r}, and none was (see: aysManager task list)",
                    EXIT_NOT_FOUND,
                )
    if as_json:
        print_json(rows)
        return
    print_table(
        ["VERSION", "WHEN", "CHANGE", "VIA", "WHO", "FIELDS"],
        [
            [
                r["version"] if r["task_id"] is not None else f"{r['version']} (deleted task)",
                local_time(r["changed_at"]),
                r["change"],
                r["via"],
                r["changed_by"],
                ", ".join(r["changed_fields"]) if r["change"] != "created" else "(all)",
            ]
            for r in rows
        ],
        flexible=["WHO", "FIELDS"],
    )


@app.command("rollback")
def rollback_task(
    task: TaskRef,
    to: Annotated[
        int,
        typer.Option(
            "--to", metavar="VERSION", min=1, help="The version whose definition comes back."
        ),
    ],
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Give a task an earlier version's definition again.

    The rollback is itself a new version; nothing changes when the task has that
    definition already."""
    with connect(env, config, root, url) as api:
        found = find_task(api, task)
        updated = api.post(f"/tasks/{found['id']}/rollback", json={"version": to})
    if as_json:
        print_json(updated)
    elif updated["version"] == found["version"]:
        typer.echo(f"task {found['name']!r} has version {to}'s definition already; nothing changed")
    else:
        changed = [k for k in TASK_FIELDS if found.get(k) != updated.get(k)]
        typer.echo(
            f"task {updated['name']!r} rolled back to version {to}'s definition: now version "
            f"{updated['version']} (changed: {', '.join(changed)})"
        )
