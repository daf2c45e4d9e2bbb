"""`aysManager apply` and `aysManager export`: tasks as code, through the manager's API.

    apply -f tasks.yaml [--prune] [--dry-run]      make the manager match the file
    export [--task TASK]... [--group GROUP]...     write the file that describes it

The file is YAML (the format is in README.md, "Tasks as code"). This module reads it itself,
so that a YAML error, or a field the manager refuses, is reported at its line in the file and
with the name of its task; the manager checks and plans (POST /api/v1/apply) and applies the
whole file in one transaction.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from ays_installer.api_client import EXIT_USAGE, JsonOption, UrlOption
from ays_installer.options import ConfigOption, EnvOption, RootOption, fail
from ays_installer.task_cli import connect, find_task, print_json

HEADER = (
    "# Ays tasks as code: `aysManager apply -f FILE` makes a manager match this file.\n"
    "# Tasks and node groups are named; a field left out takes its default.\n"
)
EXPORT_MODE = 0o600  # payloads may hold secrets (headers, environment)
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_KINDS = {"tasks": "task", "node_groups": "node group", "workflows": "workflow"}


class _Loader(yaml.SafeLoader):
    """Safe YAML whose dates stay strings (`params: 2026-01-01` is text to a task)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _Dumper(yaml.SafeDumper):
    """Safe YAML with multi-line text as a literal block (a script reads as a script)."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value and value == value.strip(" ") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


# --- reading the file -------------------------------------------------------------------------


class TasksFile:
    """A tasks file as read: its data, and where each part of it is (lines)."""

    def __init__(self, label: str, text: str) -> None:
        self.label = label
        try:
            root = yaml.compose(text, Loader=_Loader)
            data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f"{label}:{mark.line + 1}:{mark.column + 1}" if mark else label
            raise fail(f"{where}: not valid YAML: {err.problem or err.context}") from None
        except yaml.YAMLError as err:
            raise fail(f"{label}: not valid YAML: {err}") from None
        if root is None:
            raise fail(
                f"{label}: the file is empty; a tasks file holds node_groups, tasks and/or "
                "workflows (write `tasks: []` to mean none)"
            )
        if not isinstance(root, yaml.MappingNode) or not isinstance(data, dict):
            raise fail(
                f"{self.at(root)}: the file must be a mapping with node_groups, tasks "
                "and/or workflows (see: aysManager export)"
            )
        self.root: yaml.MappingNode = root
        self.data: dict[str, Any] = data
        self._check_keys_once(root)
        try:
            json.dumps(data)
        except (TypeError, ValueError) as err:
            raise fail(f"{label}: a value JSON cannot hold ({err}); write it as text") from None

    @classmethod
    def read(cls, path: str) -> TasksFile:
        if path == "-":
            return cls("<stdin>", sys.stdin.read())
        try:
            return cls(path, Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise fail(f"error: cannot read {path}: {reason}") from None

    def at(self, node: yaml.Node) -> str:
        return f"{self.label}:{node.start_mark.line + 1}"

    def _check_keys_once(self, node: yaml.Node) -> None:
        """YAML keeps the last of two equal keys silently: a typo that loses a field."""
        if isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for key, value in node.value:
                if key.value in seen:
                    raise fail(f"{self.at(key)}: {key.value!r} appears twice in this mapping")
                seen.add(key.value)
                self._check_keys_once(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self._check_keys_once(item)

    def where(self, path: str) -> tuple[yaml.Node, str | None, str]:
        """For an API field path (`tasks[2].payload.command`): the closest node of the file,
        what it belongs to (`task 'nightly'`), and the path inside that."""
        node: yaml.Node = self.root
        parts = [m.group(1) or int(m.group(2)) for m in _PATH_PART.finditer(path)]
        owner = None
        inner = path
        if len(parts) >= 2 and parts[0] in _KINDS and isinstance(parts[1], int):
            entries = self.data.get(parts[0])
            entry = entries[parts[1]] if isinstance(entries, list) else None
            name = entry.get("name") if isinstance(entry, dict) else None
            kind = _KINDS[parts[0]]
            owner = f"{kind} {name!r}" if isinstance(name, str) else f"{parts[0]}[{parts[1]}]"
            inner = ".".join(str(p) for p in parts[2:])
        shown: yaml.Node = node  # the line to name: the deepest key found
        for part in parts:
            child = _child(node, part)
            if child is None:
                break  # a field that is missing: its mapping's key says where
            shown, node = child
        return shown, owner, inner


def _child(node: yaml.Node, part: str | int) -> tuple[yaml.Node, yaml.Node] | None:
    """(the node whose line names `part`, its value) inside `node`."""
    if isinstance(node, yaml.MappingNode) and isinstance(part, str):
        for key, value in node.value:
            if key.value == part:
                return key, value
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        return node.value[part], node.value[part]
    return None


def file_errors(tasks_file: TasksFile, errors: list[dict[str, Any]]) -> list[str]:
    """The manager's field errors, each at its line of the file with its task's name."""
    lines = []
    for error in errors:
        field = str(error.get("field") or "")
        node, owner, inner = tasks_file.where(field)
        text = str(error.get("error", ""))
        if owner is not None and text.startswith(field):
            text = (inner + text[len(field) :]) if inner else text[len(field) :].lstrip(": ")
        lines.append(f"{tasks_file.at(node)}: {owner + ': ' if owner else ''}{text}")
    return lines


# --- apply ------------------------------------------------------------------------------------


def apply(
    file: Annotated[
        str,
        typer.Option(
            "-f", "--file", metavar="FILE", help="The tasks file (YAML); '-' reads stdin."
        ),
    ],
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Also delete the tasks, node groups and workflows the file does not name.",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and change nothing.")
    ] = False,
    as_json: JsonOption = False,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Make the manager match a tasks file.

    Prints the plan (create, update field by field, delete with --prune) and applies it in
    one transaction: all of it, or nothing. Applying the same file again changes nothing."""
    tasks_file = TasksFile.read(file)
    params = {"prune": str(prune).lower(), "dry_run": str(dry_run).lower()}
    with connect(env, config, root, url) as api:
        response = api.answer("POST", "/apply", json=tasks_file.data, params=params)
        if response.status_code == 422:
            body = response.json()
            errors = body.get("errors") or [body]
            for line in file_errors(tasks_file, errors):
                typer.echo(line, err=True)
            typer.echo(f"{tasks_file.label}: nothing was applied", err=True)
            raise typer.Exit(EXIT_USAGE)
        if not response.is_success:
            raise api.refused(response)
        result = response.json()
    if as_json:
        print_json(result)
        return
    print_plan(result, tasks_file.label)


def print_plan(result: dict[str, Any], label: str) -> None:
    for step in result["steps"]:
        if step["action"] == "unchanged":
            continue
        kind = step["kind"].replace("_", " ")
        typer.echo(f"{step['action']} {kind} {step['name']}")
        for change in step["changes"]:
            typer.echo(f"    {change['field']}: {_shown(change['old'])} -> {_shown(change['new'])}")
    kept = [f"node group {n}" for n in result["kept_node_groups"]]
    kept += [f"task {n}" for n in result["kept_tasks"]]
    kept += [f"workflow {n}" for n in result.get("kept_workflows", [])]
    if kept:
        typer.echo(f"not in {label}, kept (--prune deletes them): {', '.join(kept)}")
    counts = ", ".join(
        f"{result[key]} {'to ' + verb if not result['applied'] else key}"
        for key, verb in (("created", "create"), ("updated", "update"), ("deleted", "delete"))
        if result[key]
    )
    unchanged = f"{result['unchanged']} unchanged"
    if result["applied"]:
        typer.echo(f"applied: {counts}, {unchanged}")
    elif counts:
        typer.echo(f"dry run: {counts}, {unchanged}; nothing was changed")
    else:
        typer.echo(f"no change: {unchanged}")


def _shown(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)


# --- export -----------------------------------------------------------------------------------


def export(
    task: Annotated[
        list[str] | None,
        typer.Option("--task", metavar="TASK", help="Only this task (repeat for more)."),
    ] = None,
    group: Annotated[
        list[str] | None,
        typer.Option(
            "-g", "--group", metavar="GROUP", help="Only this node group's tasks (repeat)."
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            metavar="FILE",
            dir_okay=False,
            help="Write FILE (mode 0600: payloads may hold secrets) instead of stdout.",
        ),
    ] = None,
    env: EnvOption = None,
    config: ConfigOption = None,
    root: RootOption = None,
    url: UrlOption = None,
) -> None:
    """Write the tasks file of the manager's tasks and workflows.

    All node groups, tasks and workflows, or the tasks named (with their groups and the
    workflows all of whose tasks are named); each field only when it differs from its
    default. apply takes the file back unchanged."""
    with connect(env, config, root, url) as api:
        params: dict[str, Any] = {}
        if task:
            params["task_id"] = [find_task(api, ref)["id"] for ref in task]
        if group:
            params["node_group"] = group
        document = api.get("/export", params=params)
    text = HEADER + yaml.dump(
        document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False
    )
    if output is None:
        typer.echo(text, nl=False)
        return
    write_private(output, text)
    count = len(document["tasks"])
    typer.echo(
        f"wrote {output}: {count} task(s), {len(document['node_groups'])} node group(s), "
        f"{len(document.get('workflows') or [])} workflow(s)"
    )


def write_private(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a temp file renamed over it), mode 0600."""
    path = path.absolute()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise fail(f"error: cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, EXPORT_MODE)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise fail(f"error: cannot write {path}: {err.strerror or err}") from None


def add_commands(app: typer.Typer) -> None:
    app.command("apply")(apply)
    app.command("export")(export)
