"""`aysManager alerts list | deliveries | test`: the alert policies in force, the latest
notices and their deliveries, and a test notice through one channel (through the API)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from ays_installer import task_cli
from ays_installer.api_client import JsonOption, UrlOption
from ays_installer.options import ConfigOption, EnvOption, RootOption, clean_errors, fail
from ays_installer.tables import local_time, print_table

app = typer.Typer(
    no_args_is_help=True,
    help="Alert policies (the env file's alerts section): rules, deliveries, a test notice.",
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
        typer.echo("no alert rules (declare them under alerts: in the env file)")
    print_table(
        ["RULE", "WHEN", "WATCHES", "CHANNELS", "RECOVERY", "SILENCED"],
        [
            [
                r["name"],
                r["when"] + (f" x{r['count']}" if r["when"] == "consecutive_failures" else ""),
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
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="At most this many.")] = 50,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """List the latest notices, newest first, with how their delivery went."""
    params: dict[str, object] = {"limit": limit} | ({"status": status} if status else {})
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
    channel: Annotated[str, typer.Argument(metavar="CHANNEL", help="The channel's name.")],
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
