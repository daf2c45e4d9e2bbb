"""`aysManager audit`: the audit trail through the manager's API (GET /api/v1/audit)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ays_installer.api_client import JsonOption, UrlOption
from ays_installer.options import (
    ConfigOption,
    EnvOption,
    LimitOption,
    RootOption,
    SinceOption,
)
from ays_installer.tables import local_time, print_table
from ays_installer.task_cli import connect, print_json
from ays_runtime.vocabulary import AuditAction


def audit(
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            metavar="NAME",
            help="Only changes of this: a task's or group's name, 'run ID', 'IP:PORT'.",
        ),
    ] = None,
    who: Annotated[
        str | None, typer.Option("--who", metavar="TEXT", help="Only changes by a name with TEXT.")
    ] = None,
    action: Annotated[
        AuditAction | None, typer.Option("--action", help="Only this kind of change.")
    ] = None,
    since: SinceOption = None,
    limit: LimitOption = 20,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Show the audit trail, newest first: who changed what, from where, and which fields.

    --json prints each entry whole, with the definition before and after."""
    params: dict[str, Any] = {"limit": limit}
    if target is not None:
        params["target"] = target
    if who is not None:
        params["who"] = who
    if action is not None:
        params["action"] = action.value
    if since is not None:
        params["since"] = since
    with connect(env, config, root, url) as api:
        entries = api.get("/audit", params=params)["items"]
    if as_json:
        print_json(entries)
        return
    print_table(
        ["WHEN", "WHO", "VIA", "FROM", "ACTION", "TARGET", "CHANGED"],
        [
            [
                local_time(e["at"]),
                e["who"],
                e["via"],
                e["source"] or None,
                e["action"],
                e["target"],
                ", ".join(e["changed_fields"]) or None,
            ]
            for e in entries
        ],
        flexible=["WHO", "TARGET", "CHANGED"],
    )
