"""`aysManager run ...`: runs (job logs) through the manager's API.

    run list | show | logs | kill

`task trigger --wait` waits here too (`wait_for_run`) and exits with the run's exit code
(`run_exit_code`): the job's own exit code when it failed with one, and

    0    succeeded
    1    failed without an exit code (an HTTP task, a command that could not start), skipped
         or discarded
    124  timed out (as timeout(1))
    137  killed (128 + SIGKILL, as a shell reports it)
    75   node lost (EX_TEMPFAIL: its node went away; it may work when tried again)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
import typer

from ays_installer.api_client import EXIT_NOT_FOUND, JsonOption, ManagerApi, UrlOption
from ays_installer.options import (
    ConfigOption,
    EnvOption,
    LimitOption,
    RootOption,
    SinceOption,
    fail,
    parse_moment,
)
from ays_installer.tables import fields, local_time, print_table
from ays_installer.task_cli import connect, lookup_task, print_json
from ays_runtime.retry import Backoff
from ays_runtime.vocabulary import RunStatus

app = typer.Typer(
    no_args_is_help=True,
    help="List runs, read their output, follow or kill them.",
)

RunId = Annotated[int, typer.Argument(metavar="RUN", help="The run's id (see: run list).")]

EXIT_RUN_FAILED = 1
EXIT_TIMED_OUT = 124
EXIT_KILLED = 137
EXIT_NODE_LOST = 75
FINAL = {s.value for s in RunStatus if s.is_final}
RETRIED = {RunStatus.FAILED.value, RunStatus.TIMED_OUT.value, RunStatus.NODE_LOST.value}
WAIT_FIRST = 0.2  # seconds between polls while waiting for a run, growing to WAIT_MOST
WAIT_MOST = 2.0
# A followed stream says something every 15 s (keep-alive); silence this long means it broke.
STREAM_READ_TIMEOUT = 60.0
RECONNECT_FOR = 30.0  # seconds a broken stream is tried again (a manager reload) before giving up


def run_exit_code(run: dict[str, Any]) -> int:
    """The exit code `task trigger --wait` ends with, for a finished run."""
    status = run["status"]
    if status == RunStatus.SUCCEEDED.value:
        return 0
    if status == RunStatus.TIMED_OUT.value:
        return EXIT_TIMED_OUT
    if status == RunStatus.KILLED.value:
        return EXIT_KILLED
    if status == RunStatus.NODE_LOST.value:
        return EXIT_NODE_LOST
    code = run.get("exit_code")
    if status == RunStatus.FAILED.value and code is not None and 0 < code < 256:
        return int(code)  # the shell convention already: 128 + N for a signal N
    return EXIT_RUN_FAILED


def wait_for_run(api: ManagerApi, run_id: int) -> dict[str, Any]:
    """Poll the run until it ends; a failed run with a retry goes on with the retry. Each
    change of state is told on stderr. Ctrl-C stops waiting (exit 130), not the run."""
    backoff = Backoff(first=WAIT_FIRST, cap=WAIT_MOST, jitter=0.2)
    seen = ""
    try:
        while True:
            run = api.get(f"/job-logs/{run_id}")
            state = f"{run['status']} {run['node']}"
            if state != seen and not RunStatus(run["status"]).is_final:
                where = f" on {run['node']}" if run["node"] else ""
                typer.echo(f"run {run_id}: {run['status']}{where}", err=True)
                seen = state
                backoff.reset()
            if RunStatus(run["status"]).is_final:
                retry = _next_attempt(api, run) if run["status"] in RETRIED else None
                if retry is None:
                    return dict(run)
                typer.echo(
                    f"run {run_id}: {run['status']}; retry {retry['attempt']} is run {retry['id']}",
                    err=True,
                )
                run_id, seen = retry["id"], ""
                backoff.reset()
                continue
            time.sleep(backoff.next())
    except KeyboardInterrupt:
        typer.echo(
            f"\nstopped waiting; run {run_id} goes on (aysManager run show {run_id})", err=True
        )
        raise typer.Exit(130) from None


def _next_attempt(api: ManagerApi, run: dict[str, Any]) -> dict[str, Any] | None:
    """The retry written with this run's failure (same slot and shard, next attempt)."""
    since = datetime.fromisoformat(run["created_at"]).replace(tzinfo=UTC).isoformat()
    page = api.get("/job-logs", params={"task_id": run["task_id"], "since": since, "limit": 1000})
    for other in page["items"]:
        if (
            other["scheduled_at"] == run["scheduled_at"]
            and other["shard_index"] == run["shard_index"]
            and other["attempt"] == run["attempt"] + 1
        ):
            return dict(other)
    return None


def wait_for_shards(api: ManagerApi, run: dict[str, Any]) -> list[dict[str, Any]]:
    """A broadcast run's other shards (written with shard 0, the same slot), each waited for
    to its end (and through its retries), in shard order; [] for a run of one node."""
    if run["shard_total"] <= 1:
        return []
    since = datetime.fromisoformat(run["created_at"]).replace(tzinfo=UTC).isoformat()
    page = api.get("/job-logs", params={"task_id": run["task_id"], "since": since, "limit": 1000})
    shards = sorted(
        (
            other
            for other in page["items"]
            if other["scheduled_at"] == run["scheduled_at"]
            and other["attempt"] == 0
            and other["shard_index"] > 0
        ),
        key=lambda other: int(other["shard_index"]),
    )
    return [wait_for_run(api, int(shard["id"])) for shard in shards]


def worst_exit_code(runs: list[dict[str, Any]]) -> int:
    """The exit code for several runs (a broadcast's shards): the first one that is not 0."""
    return next((code for code in map(run_exit_code, runs) if code), 0)


def report_end(run: dict[str, Any]) -> None:
    """The run's output on stdout, how it ended on stderr."""
    if run["output"]:
        typer.echo(run["output"], nl=not run["output"].endswith("\n"))
    typer.echo(f"run {run['id']}: {_ending(run)}", err=True)


def _ending(run: dict[str, Any]) -> str:
    parts = [run["status"]]
    if run["node"]:
        parts.append(f"on {run['node']}")
    took = _took(run)
    if took:
        parts.append(f"in {took}")
    if run["exit_code"] is not None:
        parts.append(f"(exit {run['exit_code']})")
    if run["message"]:
        parts.append(f"- {run['message']}")
    return " ".join(parts)


def _took(run: dict[str, Any]) -> str | None:
    if not run.get("started_at") or not run.get("ended_at"):
        return None
    seconds = (
        datetime.fromisoformat(run["ended_at"]) - datetime.fromisoformat(run["started_at"])
    ).total_seconds()
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def run_rows(runs: list[dict[str, Any]], names: dict[int, str]) -> None:
    print_table(
        ["RUN", "TASK", "SCHEDULED", "TRIGGER", "TRY", "NODE", "STATUS", "EXIT", "TOOK", "MESSAGE"],
        [
            [
                r["id"],
                names.get(r["task_id"], f"#{r['task_id']}"),
                local_time(r["scheduled_at"]),
                r["trigger"],
                r["attempt"],
                r["node"] or None,
                r["status"],
                r["exit_code"],
                _took(r),
                r["message"],
            ]
            for r in runs
        ],
        flexible=["TASK", "MESSAGE", "NODE"],
    )


@app.command("list")
def list_runs(
    task: Annotated[
        str | None, typer.Option("--task", metavar="TASK", help="Only this task's runs.")
    ] = None,
    status: Annotated[
        RunStatus | None, typer.Option("--status", help="Only runs in this state.")
    ] = None,
    node: Annotated[
        str | None, typer.Option("--node", metavar="IP:PORT", help="Only this node's runs.")
    ] = None,
    since: SinceOption = None,
    until: Annotated[
        str | None,
        typer.Option("--until", metavar="WHEN", help="Only runs created before WHEN."),
    ] = None,
    limit: LimitOption = 20,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """List runs, newest first.

    Times are shown in this host's time zone."""
    params: dict[str, Any] = {"limit": limit}
    if status is not None:
        params["status"] = status.value
    if node is not None:
        params["node"] = node
    if since is not None:
        params["since"] = since
    if until is not None:
        params["until"] = parse_moment(until, "--until")
    with connect(env, config, root, url) as api:
        names: dict[int, str] = {}
        if task is not None:
            found = lookup_task(api, task)
            if found is None and not task.isdigit():
                raise fail(f"error: no task is named {task!r}", EXIT_NOT_FOUND)
            params["task_id"] = found["id"] if found else int(task)
        runs = api.get("/job-logs", params=params)["items"]
        for task_id in {r["task_id"] for r in runs}:
            known = api.find(f"/tasks/{task_id}")
            if known is not None:
                names[task_id] = known["name"]
    if as_json:
        print_json(runs)
    else:
        run_rows(runs, names)


@app.command("show")
def show_run(
    run: RunId,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Show one run.

    Its task, slot, node, state, times, exit code, message and output."""
    with connect(env, config, root, url) as api:
        found = api.get(f"/job-logs/{run}")
        task = api.find(f"/tasks/{found['task_id']}")
    if as_json:
        print_json(found)
        return
    name = f"{task['name']} (id {found['task_id']})" if task else f"#{found['task_id']} (deleted)"
    fields(
        [
            ("run", found["id"]),
            ("task", name),
            ("scheduled", local_time(found["scheduled_at"])),
            ("trigger", found["trigger"]),
            ("attempt", found["attempt"]),
            ("shard", f"{found['shard_index'] + 1} of {found['shard_total']}"),
            ("params", found["params"]),
            ("node", found["node"] or None),
            ("status", found["status"]),
            ("created", local_time(found["created_at"])),
            ("started", local_time(found["started_at"])),
            ("ended", local_time(found["ended_at"])),
            ("took", _took(found)),
            ("exit code", found["exit_code"]),
            ("message", found["message"]),
        ]
    )
    if found["output"]:
        typer.echo("output:")
        typer.echo(found["output"], nl=not found["output"].endswith("\n"))


@app.command("logs")
def run_logs(
    run: RunId,
    follow: Annotated[
        bool,
        typer.Option(
            "-f",
            "--follow",
            help="Keep printing the output as the job writes it, until the run ends; then "
            "exit with the run's exit code.",
        ),
    ] = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Print a run's output.

    Live from its node while it runs (and after, while the node keeps it), else the end of
    it as stored in the job log. With --follow the run's state changes go to stderr."""
    with connect(env, config, root, url) as api:
        if not follow:
            chunk = api.get(f"/job-logs/{run}/output")
            if chunk["text"]:
                typer.echo(chunk["text"], nl=not chunk["text"].endswith("\n"))
            return
        end = follow_output(api, run)
    raise typer.Exit(run_exit_code(end))


def follow_output(api: ManagerApi, run_id: int) -> dict[str, Any]:
    """Print the run's output as it comes (GET .../output/stream, server-sent events) until
    the run ends; its `end` event (status, exit_code, message). A stream that breaks (the
    manager reloads) is opened again from where it was, for up to RECONNECT_FOR seconds."""
    offset = 0
    backoff = Backoff(first=0.5, cap=5.0)
    broken_since: float | None = None
    timeout = httpx.Timeout(10.0, read=STREAM_READ_TIMEOUT)
    try:
        while True:
            try:
                with api.client.stream(
                    "GET",
                    f"/job-logs/{run_id}/output/stream",
                    params={"offset": offset},
                    timeout=timeout,
                ) as response:
                    if not response.is_success:
                        response.read()
                        raise api.refused(response)
                    broken_since = None
                    for kind, data in server_sent_events(response.iter_lines()):
                        if kind == "output":
                            typer.echo(data["text"], nl=False)
                            offset = data["next"]
                        elif kind == "status" and data["status"] not in FINAL:
                            where = f" on {data['node']}" if data["node"] else ""
                            typer.echo(f"run {run_id}: {data['status']}{where}", err=True)
                        elif kind == "end":
                            end = {**data, "id": run_id}
                            typer.echo(f"run {run_id}: {_ending({**_EMPTY_RUN, **end})}", err=True)
                            return end
            except (httpx.TransportError, httpx.RemoteProtocolError) as err:
                now = time.monotonic()
                broken_since = broken_since or now
                if now - broken_since > RECONNECT_FOR:
                    raise api.unreachable(err) from None
            time.sleep(backoff.next())
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; run {run_id} goes on", err=True)
        raise typer.Exit(130) from None


_EMPTY_RUN: dict[str, Any] = {"node": "", "started_at": None, "ended_at": None}


def server_sent_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a text/event-stream; comments (keep-alives) skipped."""
    kind, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)


@app.command("kill")
def kill_run(
    run: RunId,
    reason: Annotated[
        str,
        typer.Option("--reason", metavar="TEXT", help="Why: recorded in the run's message."),
    ] = "killed by operator",
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """End a run wherever it is.

    A pending run, or a retry waiting its backoff, ends at once; a running one is killed on
    its node with its whole process group. Exit 1 when it had ended already."""
    with connect(env, config, root, url) as api:
        answer = api.post(f"/job-logs/{run}/kill", json={"reason": reason})
    typer.echo(f"run {run}: {answer['status']}: {answer['detail']}")
