"""`aysManager user add | list | set | passwd | unlock | remove` and `aysManager token
create | list | revoke`: users, roles and personal API tokens, through the manager's API
(/api/v1/users, /api/v1/me/tokens). A password is read from the terminal without echo (or
one line of standard input with --password-stdin), never from the command line; a new token
is printed once, and nothing else ever shows it. `user unlock` ends a console sign-in
lock-out (ays_runtime/users/lockout.py)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from ays_installer import task_cli
from ays_installer.api_client import JsonOption, UrlOption
from ays_installer.options import ConfigOption, EnvOption, RootOption, clean_errors, fail
from ays_installer.tables import local_time, print_table
from ays_runtime.vocabulary import Role

user_app = typer.Typer(
    no_args_is_help=True,
    help="Users and their roles: admin, operator (of node groups), viewer.",
)
token_app = typer.Typer(
    no_args_is_help=True, help="Personal API tokens: created (shown once), listed, revoked."
)

GroupOption = Annotated[
    list[str] | None,
    typer.Option(
        "-g", "--group", metavar="GROUP", help="A node group an operator may change (repeat)."
    ),
]
PasswordStdin = Annotated[
    bool,
    typer.Option("--password-stdin", help="Read the password from one line of standard input."),
]


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise fail("error: no terminal to ask the password on; pipe it with --password-stdin")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@user_app.command("add")
@clean_errors
def user_add(
    name: Annotated[str, typer.Argument(help="The user's name (letters, digits, _ . @ -).")],
    role: Annotated[Role, typer.Option("-r", "--role", help="What the user may do.")],
    group: GroupOption = None,
    no_password: Annotated[
        bool, typer.Option("--no-password", help="No console password (API tokens only).")
    ] = False,
    password_stdin: PasswordStdin = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Add a user; asks for their console password unless --no-password."""
    body: dict[str, Any] = {"name": name, "role": role.value, "groups": group or []}
    if not no_password:
        body["password"] = _password(password_stdin)
    with task_cli.connect(env, config, root, url) as api:
        made = api.post("/users", json=body)
    groups = f", groups {', '.join(made['groups'])}" if made["groups"] else ""
    typer.echo(f"added user {made['name']} ({made['role']}{groups})")


@user_app.command("list")
@clean_errors
def user_list(
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """List the users with their roles and groups, and who is locked out of the console
    (too many wrong passwords: `user unlock` ends it)."""
    with task_cli.connect(env, config, root, url) as api:
        users = api.get("/users")["items"]
    if as_json:
        task_cli.print_json(users)
        return
    print_table(
        ["USER", "ROLE", "GROUPS", "PASSWORD", "LOCKED OUT UNTIL", "CHANGED"],
        [
            [
                u["name"],
                u["role"],
                ", ".join(u["groups"]) or None,
                "set" if u["password_set"] else "none",
                local_time(u["locked_until"]) if u.get("locked_until") else None,
                local_time(u["updated_at"]),
            ]
            for u in users
        ],
        flexible=["GROUPS"],
    )


@user_app.command("set")
@clean_errors
def user_set(
    name: Annotated[str, typer.Argument(help="The user.")],
    role: Annotated[Role | None, typer.Option("-r", "--role", help="A new role.")] = None,
    group: GroupOption = None,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Change a user's role and/or node groups (the groups given replace the old ones)."""
    body: dict[str, Any] = {}
    if role is not None:
        body["role"] = role.value
    if group is not None:
        body["groups"] = group
    if not body:
        raise fail("error: nothing to change: give --role and/or --group")
    with task_cli.connect(env, config, root, url) as api:
        done = api.call("PATCH", f"/users/{name}", json=body)
    groups = f", groups {', '.join(done['groups'])}" if done["groups"] else ""
    typer.echo(f"user {done['name']} is now {done['role']}{groups}")


@user_app.command("passwd")
@clean_errors
def user_passwd(
    name: Annotated[str, typer.Argument(help="The user.")],
    password_stdin: PasswordStdin = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Set a user's console password."""
    password = _password(password_stdin)
    with task_cli.connect(env, config, root, url) as api:
        api.call("PATCH", f"/users/{name}", json={"password": password})
    typer.echo(f"set the password of {name}")


@user_app.command("unlock")
@clean_errors
def user_unlock(
    name: Annotated[str, typer.Argument(help="The user.")],
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """End a user's console sign-in lock-out and forget their failed sign-ins."""
    with task_cli.connect(env, config, root, url) as api:
        done = api.post(f"/users/{name}/unlock")
    if done["was_locked_until"]:
        until = local_time(done["was_locked_until"])
        typer.echo(f"unlocked {name} (locked out until {until})")
    elif done["failures_cleared"]:
        typer.echo(f"{name} was not locked out; forgot {done['failures_cleared']} failed sign-ins")
    else:
        typer.echo(f"{name} was not locked out")


@user_app.command("remove")
@clean_errors
def user_remove(
    name: Annotated[str, typer.Argument(help="The user.")],
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Remove a user and their tokens (refused from the next request on)."""
    with task_cli.connect(env, config, root, url) as api:
        api.call("DELETE", f"/users/{name}")
    typer.echo(f"removed user {name}")


UserOption = Annotated[
    str | None,
    typer.Option(
        "-u",
        "--user",
        metavar="USER",
        help="Whose tokens (an admin's call); without it, the caller's own (AYS_TOKEN).",
    ),
]


def _tokens_path(user: str | None) -> str:
    return f"/users/{user}/tokens" if user else "/me/tokens"


@token_app.command("create")
@clean_errors
def token_create(
    name: Annotated[str, typer.Argument(help="What the token is for, e.g. ci or laptop.")],
    user: UserOption = None,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Create a token and print it, this once (stored only hashed: keep it now)."""
    with task_cli.connect(env, config, root, url) as api:
        made = api.post(_tokens_path(user), json={"name": name})
    typer.echo(made["token"])
    typer.echo(
        f"token {made['id']} ({made['name']}, {made['prefix']}...): shown this once; send it "
        "as 'Authorization: Bearer <token>', or AYS_TOKEN for this CLI",
        err=True,
    )


@token_app.command("list")
@clean_errors
def token_list(
    user: UserOption = None,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """List tokens: id, name, first characters, created, last used (never the token)."""
    with task_cli.connect(env, config, root, url) as api:
        tokens = api.get(_tokens_path(user))["items"]
    if as_json:
        task_cli.print_json(tokens)
        return
    print_table(
        ["ID", "NAME", "PREFIX", "CREATED", "LAST USED"],
        [
            [
                t["id"],
                t["name"],
                t["prefix"] + "...",
                local_time(t["created_at"]),
                local_time(t["last_used_at"]) if t["last_used_at"] else "never",
            ]
            for t in tokens
        ],
    )


@token_app.command("revoke")
@clean_errors
def token_revoke(
    token_id: Annotated[int, typer.Argument(metavar="ID", help="The token's id (token list).")],
    user: UserOption = None,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Revoke a token: refused from the next request on."""
    with task_cli.connect(env, config, root, url) as api:
        api.call("DELETE", f"{_tokens_path(user)}/{token_id}")
    typer.echo(f"revoked token {token_id}")
