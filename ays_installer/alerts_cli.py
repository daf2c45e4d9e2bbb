"""`aysManager alerts ...`: the alert policies through the manager's API.

    list | channels | open | deliveries     what is in force, what fired, what was sent
    add | remove                           a rule made through the API
    add-channel | remove-channel           a channel made through the API
    silence | unsilence                    a silence window on any rule
    test                                   a test notice through one channel

The env file's channels and rules are shown with source `env` and are changed by editing it.
A channel's secret (a webhook's HMAC key, an SMTP password) is read from an environment
variable (`--secret-env VAR`), never from the command line, where `ps` would show it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from ays_installer import task_cli
from ays_installer.api_client import JsonOption, UrlOption
from ays_installer.options import (
    AGO,
    UNITS,
    ConfigOption,
    EnvOption,
    LimitOption,
    RootOption,
    SinceOption,
    clean_errors,
    fail,
)
from ays_installer.tables import local_time, print_table

RuleName = Annotated[str, typer.Argument(metavar="RULE", help="The rule's name.")]
ChannelName = Annotated[str, typer.Argument(metavar="CHANNEL", help="The channel's name.")]

app = typer.Typer(
    no_args_is_help=True,
    help="Alert policies (the env file's and the API's): rules, channels, silences, "
    "deliveries, a test notice.",
)


@app.command("list")
@clean_errors
def alerts_list(
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """List the alert rules in force, with their channels."""
    with task_cli.connect(env, config, root, url) as api:
        policies = api.get("/alerts/rules")
    if as_json:
        task_cli.print_json(policies)
        return
    kinds = {c["name"]: c["type"] for c in policies["channels"]}
    if not policies["rules"]:
        typer.echo(
            "no alert rules (declare them under alerts: in the env file, or: aysManager alerts add)"
        )
    print_table(
        ["RULE", "SOURCE", "WHEN", "WATCHES", "CHANNELS", "RECOVERY", "SILENCED"],
        [
            [
                r["name"] + (f" (broken: {r['broken']})" if r.get("broken") else ""),
                r["source"],
                _when(r),
                ", ".join(
                    [f"task {t}" for t in r["tasks"]] + [f"group {g}" for g in r["node_groups"]]
                )
                or "every task",
                ", ".join(f"{c} ({kinds.get(c, '?')})" for c in r["channels"]),
                "yes" if r["recovery"] else "no",
                "now" if r["silenced"] else "no",
            ]
            for r in policies["rules"]
        ],
        flexible=["WATCHES", "CHANNELS"],
    )


@app.command("deliveries")
@clean_errors
def alerts_deliveries(
    status: Annotated[
        str | None,
        typer.Option("--status", metavar="STATUS", help="Only these: queued, sent or failed."),
    ] = None,
    since: SinceOption = None,
    limit: LimitOption = 50,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """List the latest notices, newest first, with how their delivery went."""
    params: dict[str, object] = {"limit": limit} | ({"status": status} if status else {})
    if since is not None:
        params["since"] = since
    with task_cli.connect(env, config, root, url) as api:
        items = api.get("/alerts/deliveries", params=params)["items"]
    if as_json:
        task_cli.print_json(items)
        return
    print_table(
        ["ID", "CREATED", "RULE", "KIND", "CHANNEL", "STATUS", "TRIES", "SUMMARY / LAST ERROR"],
        [
            [
                d["id"],
                local_time(d["created_at"]),
                d["rule"],
                d["kind"],
                d["channel"],
                d["status"],
                d["attempts"],
                d["summary"] if d["status"] == "sent" else d["last_error"] or d["summary"],
            ]
            for d in items
        ],
        flexible=["SUMMARY / LAST ERROR"],
    )


@app.command("test")
@clean_errors
def alerts_test(
    channel: ChannelName,
    wait: Annotated[
        float,
        typer.Option("--wait", min=0, metavar="SECONDS", help="How long to wait for it."),
    ] = 15.0,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Send a test notice through CHANNEL and say whether it was taken (exit 1 if not yet:
    it stays queued and is retried)."""
    with task_cli.connect(env, config, root, url) as api:
        delivery = api.post("/alerts/test", json={"channel": channel})["delivery_id"]
        typer.echo(f"queued test notice {delivery} for channel {channel}")
        deadline = time.monotonic() + wait
        while True:
            items = api.get("/alerts/deliveries", params={"limit": 1000})["items"]
            row = next((d for d in items if d["id"] == delivery), None)
            if row is not None and row["status"] == "sent":
                tries = row["attempts"]
                typer.echo(
                    f"channel {channel} took it ({tries} {'try' if tries == 1 else 'tries'})"
                )
                return
            if time.monotonic() >= deadline or (row is not None and row["status"] == "failed"):
                why = (
                    row["last_error"] if row is not None and row["last_error"] else "no answer yet"
                )
                raise fail(
                    f"channel {channel} has not taken test notice {delivery} after {wait:g}s: "
                    f"{why}; it stays queued and is retried (see: aysManager alerts deliveries)",
                    1,
                )
            time.sleep(0.3)


def _when(rule: dict[str, Any]) -> str:
    when = str(rule["when"])
    if when == "consecutive_failures":
        return f"{when} x{rule['count']}"
    if when in ("running_longer_than", "started_late"):
        limit = f"{when} {rule['seconds']:g}s"
        if rule.get("factor"):
            limit += f" or {rule['factor']:g} x p95 of {rule['history']} runs"
        return limit
    return when


@app.command("channels")
@clean_errors
def alerts_channels(
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """List the channels: the env file's and those made through the API (secrets are shown
    as set or not, never their value)."""
    with task_cli.connect(env, config, root, url) as api:
        items = api.get("/alerts/channels")["items"]
    if as_json:
        task_cli.print_json(items)
        return
    print_table(
        ["CHANNEL", "SOURCE", "TYPE", "TO", "SECRET"],
        [
            [
                c["name"],
                c["source"],
                c["type"] if c["type"] == "email" else f"webhook ({c['format']})",
                c["url"] if c["type"] == "webhook" else ", ".join(c["to"]) + f" via {c['host']}",
                "set" if c.get("secret_set") or c.get("password_set") else "none",
            ]
            for c in items
        ],
        flexible=["TO"],
    )


@app.command("open")
@clean_errors
def alerts_open(
    hours: Annotated[
        float, typer.Option("--hours", min=0.01, metavar="H", help="How far back to look.")
    ] = 24,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """List what fired in the last --hours and has not been resolved since."""
    with task_cli.connect(env, config, root, url) as api:
        items = api.get("/alerts/open", params={"hours": hours})["items"]
    if as_json:
        task_cli.print_json(items)
        return
    print_table(
        ["SINCE", "RULE", "SUBJECT", "SUMMARY"],
        [[local_time(a["since"]), a["rule"], a["subject"], a["summary"]] for a in items],
        flexible=["SUMMARY"],
    )


# A rule or a channel made through the API: `kind` names it in the paths and the messages.
Kind = Literal["rule", "channel"]


def _save(
    kind: Kind,
    name: str,
    body: dict[str, Any],
    replace: bool,
    env: str | None,
    config: Path | None,
    root: Path | None,
    url: str | None,
) -> None:
    """Add the alert `kind` of that name, or with `replace` replace the one made before (the
    API's refusal is the command's: its message and exit code, see api_client)."""
    with task_cli.connect(env, config, root, url) as api:
        if replace:
            api.call("PUT", f"/alerts/{kind}s/{name}", json=body)
            typer.echo(f"replaced alert {kind} {name}")
        else:
            api.post(f"/alerts/{kind}s", json=body)
            typer.echo(f"added alert {kind} {name}")


def _remove(
    kind: Kind, name: str, env: str | None, config: Path | None, root: Path | None, url: str | None
) -> None:
    with task_cli.connect(env, config, root, url) as api:
        api.call("DELETE", f"/alerts/{kind}s/{name}")
    typer.echo(f"removed alert {kind} {name}")


WHEN_HELP = (
    "run_failed, consecutive_failures, started_late, running_longer_than, node_offline, "
    "group_unhealthy or slot_missed."
)


@app.command("add")
@clean_errors
def alerts_add(
    name: RuleName,
    when: Annotated[
        str, typer.Option("--when", metavar="WHEN", help=f"What it watches: {WHEN_HELP}")
    ],
    channels: Annotated[
        list[str],
        typer.Option("--channel", metavar="CHANNEL", help="A channel it notifies; repeatable."),
    ],
    tasks: Annotated[
        list[str] | None,
        typer.Option("--task", metavar="TASK", help="Only this task (name); repeatable."),
    ] = None,
    groups: Annotated[
        list[str] | None,
        typer.Option("--group", metavar="GROUP", help="Only this node group; repeatable."),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option("--count", metavar="N", help="For consecutive_failures: the runs in a row."),
    ] = None,
    seconds: Annotated[
        float | None,
        typer.Option(
            "--seconds", metavar="S", help="For running_longer_than and started_late: the limit."
        ),
    ] = None,
    factor: Annotated[
        float | None,
        typer.Option(
            "--factor",
            metavar="X",
            help="For running_longer_than: also X times the task's usual duration (p95).",
        ),
    ] = None,
    history: Annotated[
        int | None,
        typer.Option("--history", metavar="N", help="--factor: the p95 of the last N runs."),
    ] = None,
    recovery: Annotated[
        bool, typer.Option("--recovery/--no-recovery", help="Notify when it clears.")
    ] = True,
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace the rule of that name made before.")
    ] = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Add an alert rule (stored by the manager, in force at once; audited)."""
    body: dict[str, Any] = {
        "name": name,
        "when": when,
        "channels": channels,
        "tasks": tasks or [],
        "node_groups": groups or [],
        "recovery": recovery,
    }
    optional = {"count": count, "seconds": seconds, "factor": factor, "history": history}
    body |= {k: v for k, v in optional.items() if v is not None}
    _save("rule", name, body, replace, env, config, root, url)


@app.command("remove")
@clean_errors
def alerts_remove(
    name: RuleName,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Remove an alert rule made through the API (the env file's are removed there)."""
    _remove("rule", name, env, config, root, url)


def _secret(variable: str | None, option: str) -> str | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise fail(f"error: {option} {variable}: that environment variable is not set or empty")
    return value


@app.command("add-channel")
@clean_errors
def alerts_add_channel(
    name: ChannelName,
    kind: Annotated[
        str, typer.Option("--type", metavar="TYPE", help="The channel's kind: webhook or email.")
    ] = "webhook",
    target: Annotated[
        str | None,
        typer.Option("--webhook-url", metavar="URL", help="Webhook: where to POST notices."),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format", metavar="FORMAT", help="Webhook: ays, slack, dingtalk, wecom or feishu."
        ),
    ] = None,
    secret_env: Annotated[
        str | None,
        typer.Option(
            "--secret-env",
            metavar="VAR",
            help="Webhook: the environment variable holding its signing secret; email: "
            "holding the SMTP password.",
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option("--host", metavar="HOST", help="Email: the SMTP server.")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", metavar="PORT", help="Email: the SMTP server's port.")
    ] = None,
    starttls: Annotated[
        bool | None,
        typer.Option("--starttls/--no-starttls", help="Email: upgrade with STARTTLS."),
    ] = None,
    username: Annotated[
        str | None, typer.Option("--username", metavar="USER", help="Email: the SMTP user.")
    ] = None,
    sender: Annotated[
        str | None, typer.Option("--sender", metavar="ADDRESS", help="Email: the From address.")
    ] = None,
    to: Annotated[
        list[str] | None,
        typer.Option("--to", metavar="ADDRESS", help="Email: a recipient; repeatable."),
    ] = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace", help="Replace the channel of that name (no --secret-env: keep it)."
        ),
    ] = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Add an alert channel (stored by the manager, its secret write-only; audited)."""
    body: dict[str, Any] = {"name": name, "type": kind}
    secret = _secret(secret_env, "--secret-env")
    fields = {
        "url": target,
        "format": fmt,
        "host": host,
        "port": port,
        "starttls": starttls,
        "username": username,
        "sender": sender,
        "to": to,
        "secret" if kind != "email" else "password": secret,
    }
    body |= {k: v for k, v in fields.items() if v is not None}
    _save("channel", name, body, replace, env, config, root, url)


@app.command("remove-channel")
@clean_errors
def alerts_remove_channel(
    name: ChannelName,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Remove an alert channel made through the API (refused while a rule notifies it)."""
    _remove("channel", name, env, config, root, url)


@app.command("silence")
@clean_errors
def alerts_silence(
    name: RuleName,
    duration: Annotated[
        str, typer.Option("--for", metavar="DURATION", help="How long: 30m, 2h, 1d.")
    ] = "1h",
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Silence a rule (the env file's too) from now on, for --for."""
    match = AGO.match(duration.strip())
    if match is None:
        raise fail(f"error: --for {duration!r} is not a duration: 30s, 15m, 2h or 7d")
    seconds = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}[
        UNITS[match.group(2)]
    ] * int(match.group(1))
    if seconds <= 0:
        raise fail("error: --for must be longer than nothing (e.g. --for 1h)")
    with task_cli.connect(env, config, root, url) as api:
        window = api.post(f"/alerts/rules/{name}/silences", json={"minutes": seconds / 60})
    typer.echo(f"silenced alert rule {name} until {local_time(window['end'])}")


@app.command("unsilence")
@clean_errors
def alerts_unsilence(
    name: RuleName,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """End now the silences set on a rule through the API or the console."""
    with task_cli.connect(env, config, root, url) as api:
        ended = api.call("DELETE", f"/alerts/rules/{name}/silences")["ended"]
    typer.echo(f"ended {ended} silence(s) of alert rule {name}")
