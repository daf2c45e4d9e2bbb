"""Tasks as code: make the manager's node groups and tasks match a document, and write the
document that describes them (`export`).

A document (`TasksDocument`) lists node groups, tasks and workflows, each identified by its
name; a field left out means its default, so a document is the whole definition of what it
names, and what `export` writes (only the fields that differ from their defaults) comes back
through `apply` unchanged.

`apply_document` first checks the whole document with the API's own validation (every
problem found is reported, `tasks[2].schedule`-style, as one `InvalidDocument`), then plans,
per group, task and workflow: create, update (field by field), unchanged, and with `prune`
delete what the document does not name (a node group only when no task of the document runs
in it). Workflows come after the tasks they name (a workflow's tasks are compared as a set).
Unless it is a dry run, the plan is then carried out in one transaction, through the task
service's own steps (each change of a task recording its version, via `apply`; each change of
a workflow its audit entry): all of it or, on any error, nothing. The caller reconciles once
afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel
from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from ays_runtime.exceptions import ConflictError, InvalidDocument, NotFoundError, ValidationError
from ays_runtime.manager import tasks, versions
from ays_runtime.manager.schemas import (
    PAYLOAD_MODELS,
    NodeGroupCreate,
    TaskCreate,
    TasksDocument,
    WorkflowCreate,
    every_error,
    validated,
)
from ays_runtime.manager.versions import API_ACTOR, Actor
from ays_runtime.scheduler.schedule import parse_schedule
from ays_runtime.storage.models import NodeGroup, Task, TaskType, Workflow, WorkflowTask
from ays_runtime.vocabulary import ChangeVia
from ays_runtime.workflows import store as workflow_store

Kind = Literal["node_group", "task", "workflow"]


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class FieldChange:
    field: str
    old: Any
    new: Any


@dataclass
class Step:
    """What the plan does to one node group or task."""

    kind: Kind
    name: str
    action: Action
    changes: list[FieldChange] = field(default_factory=list)  # an update's, field by field


@dataclass
class Plan:
    steps: list[Step]
    # Named by the manager, not by the document, and kept (no prune).
    kept_groups: list[str]
    kept_tasks: list[str]
    kept_workflows: list[str] = field(default_factory=list)
    applied: bool = False

    @property
    def changes(self) -> bool:
        return any(step.action != Action.UNCHANGED for step in self.steps)

    def count(self, action: Action) -> int:
        return sum(1 for step in self.steps if step.action == action)


@dataclass
class _Checked:
    groups: list[NodeGroupCreate]
    tasks: list[TaskCreate]
    columns: dict[str, dict[str, Any]]  # task name -> its columns as stored
    workflows: list[WorkflowCreate] = field(default_factory=list)


# --- apply ----------------------------------------------------------------------------------


@tasks.storage_errors("apply the document")
def apply_document(
    session: Session,
    document: Mapping[str, Any],
    *,
    prune: bool = False,
    dry_run: bool = False,
    actor: Actor = API_ACTOR,
) -> Plan:
    """Plan the changes that make the manager match `document` and, unless `dry_run`, make
    them in one transaction (committed here). Raises InvalidDocument listing every bad field,
    ConflictError or StorageError (nothing is then changed)."""
    try:
        checked = _check(session, document, prune)
        plan = _plan(session, checked, prune)
        if dry_run or not plan.changes:
            session.rollback()
            return plan
        _carry_out(session, plan, checked, actor.through(ChangeVia.APPLY))
        session.commit()
    except BaseException:
        session.rollback()
        raise
    plan.applied = True
    return plan


def _check(session: Session, document: Mapping[str, Any], prune: bool) -> _Checked:
    doc = validated(TasksDocument, document)
    errors: list[ValidationError] = []
    groups: list[NodeGroupCreate] = []
    seen_groups: dict[str, int] = {}
    for i, data in enumerate(doc.node_groups or ()):
        where = f"node_groups[{i}]"
        if _seen_before(data, seen_groups, i, "node_groups", errors):
            continue
        group, problems = every_error(NodeGroupCreate, data, prefix=where)
        errors += problems
        if group is not None:
            groups.append(group)

    known_groups = set(seen_groups) | set(session.scalars(select(NodeGroup.name)))
    specs: list[TaskCreate] = []
    columns: dict[str, dict[str, Any]] = {}
    seen_tasks: dict[str, int] = {}
    for i, data in enumerate(doc.tasks or ()):
        where = f"tasks[{i}]"
        if _seen_before(data, seen_tasks, i, "tasks", errors):
            continue
        group_name = data.get("node_group")
        if isinstance(group_name, str) and group_name not in known_groups:
            errors.append(
                ValidationError(
                    f"{where}.node_group",
                    group_name,
                    "a node group of the manager or of the document's node_groups; "
                    f"the known ones are: {', '.join(sorted(known_groups)) or 'none'}",
                )
            )
        spec, problems = every_error(TaskCreate, data, prefix=where)
        if spec is None:
            errors += problems
            continue
        try:
            columns[spec.name] = _within(where, tasks.task_columns, spec)
        except ValidationError as err:
            errors.append(err)
            continue
        specs.append(spec)
    flows = _check_workflows(session, doc.workflows or [], {s.name for s in specs}, prune, errors)
    if errors:
        raise InvalidDocument(errors)
    return _Checked(groups, specs, columns, flows)


def _check_workflows(
    session: Session,
    entries: list[dict[str, Any]],
    named_tasks: set[str],
    prune: bool,
    errors: list[ValidationError],
) -> list[WorkflowCreate]:
    """The document's workflows, each naming tasks that will exist (the document's, or the
    manager's when not pruned) and that no other workflow will hold."""
    stored_tasks = set(session.scalars(select(Task.name)))
    known = named_tasks if prune else named_tasks | stored_tasks
    # task -> the stored workflow holding it, for the workflows the document leaves as they are
    holder = dict(
        session.execute(
            select(Task.name, Workflow.name)
            .join(WorkflowTask, WorkflowTask.task_id == Task.id)
            .join(Workflow, Workflow.id == WorkflowTask.workflow_id)
        ).all()
    )
    named_flows = {e.get("name") for e in entries if isinstance(e, dict)}
    held: dict[str, str] = {}
    out: list[WorkflowCreate] = []
    seen: dict[str, int] = {}
    for i, data in enumerate(entries):
        where = f"workflows[{i}]"
        if _seen_before(data, seen, i, "workflows", errors):
            continue
        spec, problems = every_error(WorkflowCreate, data, prefix=where)
        if spec is None:
            errors += problems
            continue
        try:
            if spec.schedule:
                parse_schedule(spec.schedule, spec.timezone)
        except ValidationError as err:
            errors.append(ValidationError(f"{where}.{err.field}", err.value, err.expected))
            continue
        missing = [t for t in spec.tasks if t not in known]
        if missing:
            errors.append(
                ValidationError(
                    f"{where}.tasks",
                    missing,
                    "tasks of the document"
                    + ("" if prune else " or of the manager")
                    + f"; {', '.join(map(repr, missing))} is not",
                )
            )
            continue
        for task in spec.tasks:
            other = held.get(task)
            if other is None and not prune and holder.get(task) not in (None, *named_flows):
                other = holder[task]
            if other is not None:
                errors.append(
                    ValidationError(
                        f"{where}.tasks",
                        task,
                        f"a task of no other workflow; {task!r} is in workflow {other!r}",
                    )
                )
                break
            held[task] = spec.name
        else:
            out.append(spec)
    return out


def _within(
    where: str, check: Callable[[TaskCreate], dict[str, Any]], spec: TaskCreate
) -> dict[str, Any]:
    """`check(spec)`, its ValidationError's field put under `where`."""
    try:
        return check(spec)
    except ValidationError as err:
        raise ValidationError(f"{where}.{err.field}", err.value, err.expected) from None


def _seen_before(
    data: dict[str, Any], seen: dict[str, int], i: int, part: str, errors: list[ValidationError]
) -> bool:
    """Whether an earlier entry of `part` has the name of entry `i` (an error when so)."""
    name = data.get("name")
    if not isinstance(name, str):
        return False  # validation names the problem
    if name in seen:
        errors.append(
            ValidationError(
                f"{part}[{i}].name",
                name,
                f"a name used once in the document; {part}[{seen[name]}] has it too",
            )
        )
        return True
    seen[name] = i
    return False


def _plan(session: Session, checked: _Checked, prune: bool) -> Plan:
    steps: list[Step] = []
    stored_groups = {g.name: g for g in session.scalars(select(NodeGroup))}
    for group in checked.groups:
        stored = stored_groups.get(group.name)
        if stored is None:
            steps.append(Step("node_group", group.name, Action.CREATE))
        elif stored.description != group.description:
            change = FieldChange("description", stored.description, group.description)
            steps.append(Step("node_group", group.name, Action.UPDATE, [change]))
        else:
            steps.append(Step("node_group", group.name, Action.UNCHANGED))

    stored_tasks = {t.name: t for t in session.scalars(select(Task).order_by(Task.name))}
    for spec in checked.tasks:
        task = stored_tasks.get(spec.name)
        if task is None:
            steps.append(Step("task", spec.name, Action.CREATE))
            continue
        diff = _diff(versions.definition(task), checked.columns[spec.name])
        steps.append(Step("task", spec.name, Action.UPDATE if diff else Action.UNCHANGED, diff))

    named_tasks = {spec.name for spec in checked.tasks}
    extra_tasks = [name for name in stored_tasks if name not in named_tasks]
    used_groups = {g.name for g in checked.groups} | {s.node_group for s in checked.tasks}
    # A group its nodes created is theirs: a prune leaves it (their next beat would bring it
    # back anyway).
    extra_groups = sorted(
        name
        for name, group in stored_groups.items()
        if name not in used_groups and not group.auto_created
    )
    stored_flows = {w.name: w for w in session.scalars(select(Workflow).order_by(Workflow.name))}
    for flow in checked.workflows:
        wf = stored_flows.get(flow.name)
        if wf is None:
            steps.append(Step("workflow", flow.name, Action.CREATE))
            continue
        diff = _diff(_flow_definition(session, wf), _flow_spec(flow))
        steps.append(Step("workflow", flow.name, Action.UPDATE if diff else Action.UNCHANGED, diff))
    named_flows = {flow.name for flow in checked.workflows}
    extra_flows = [name for name in stored_flows if name not in named_flows]

    if not prune:
        return Plan(steps, extra_groups, extra_tasks, extra_flows)
    steps += [Step("workflow", name, Action.DELETE) for name in extra_flows]
    steps += [Step("task", name, Action.DELETE) for name in extra_tasks]
    steps += [Step("node_group", name, Action.DELETE) for name in extra_groups]
    return Plan(steps, [], [], [])


def _flow_definition(session: Session, wf: Workflow) -> dict[str, Any]:
    return workflow_store.definition(session, wf)  # its tasks sorted by name


def _flow_spec(spec: WorkflowCreate) -> dict[str, Any]:
    """A workflow of the document as stored: its tasks a set (sorted by name)."""
    out = workflow_store.spec_of(spec)
    out["tasks"] = sorted(set(out["tasks"]))
    return out


def _diff(current: dict[str, Any], wanted: dict[str, Any]) -> list[FieldChange]:
    """Field by field; within a mapping (the payload, its env), key by key."""
    out = []
    for key, new in wanted.items():
        old = current.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            inner = _diff(old, new) + [
                FieldChange(k, v, None) for k, v in old.items() if k not in new
            ]
            out += [FieldChange(f"{key}.{c.field}", c.old, c.new) for c in inner]
        else:
            out.append(FieldChange(key, old, new))
    return out


def _carry_out(session: Session, plan: Plan, checked: _Checked, actor: Actor) -> None:
    groups = {g.name: g for g in checked.groups}
    specs = {s.name: s for s in checked.tasks}
    by_kind: dict[Kind, list[Step]] = {"node_group": [], "task": [], "workflow": []}
    for step in plan.steps:
        by_kind[step.kind].append(step)
    # Groups first (tasks run in them), deleted groups last (their tasks go before them).
    for step in by_kind["node_group"]:
        if step.action == Action.CREATE:
            tasks.insert_node_group(session, groups[step.name], actor)
        elif step.action == Action.UPDATE:
            group = _one(session, NodeGroup, NodeGroup.name == step.name, step)
            tasks.describe_node_group(session, group, groups[step.name].description, actor)
    session.flush()
    # Workflows pruned go before their tasks might.
    for step in by_kind["workflow"]:
        if step.action == Action.DELETE:
            wf = _one(session, Workflow, Workflow.name == step.name, step)
            workflow_store.remove_workflow(session, wf, actor)
    for step in _parents_first(by_kind["task"], specs):
        if step.action == Action.CREATE:
            tasks.insert_task(session, specs[step.name], actor)
        elif step.action == Action.UPDATE:
            task = _one(session, Task, Task.name == step.name, step)
            tasks.change_task(session, task, specs[step.name], actor)
        elif step.action == Action.DELETE:
            tasks.remove_task(session, _one(session, Task, Task.name == step.name, step), actor)
    for step in by_kind["node_group"]:
        if step.action == Action.DELETE:
            group = _one(session, NodeGroup, NodeGroup.name == step.name, step)
            tasks.remove_node_group(session, group, actor)
    session.flush()
    _carry_out_workflows(session, by_kind["workflow"], checked, actor)


def _carry_out_workflows(
    session: Session, steps: list[Step], checked: _Checked, actor: Actor
) -> None:
    """Create and update the document's workflows, after the tasks they name."""
    specs = {s.name: s for s in checked.workflows}
    changed = [s for s in steps if s.action == Action.UPDATE]
    # Their tasks are let go of first: a task may move from one workflow of the document to
    # another.
    befores = {}
    for step in changed:
        wf = _one(session, Workflow, Workflow.name == step.name, step)
        befores[step.name] = (wf, workflow_store.definition(session, wf))
        session.execute(delete(WorkflowTask).where(WorkflowTask.workflow_id == wf.id))
    session.flush()
    for step in steps:
        try:
            if step.action == Action.CREATE:
                workflow_store.insert_workflow(session, specs[step.name], actor)
            elif step.action == Action.UPDATE:
                wf, before = befores[step.name]
                workflow_store.change_workflow(session, wf, specs[step.name], actor, before)
        except ValidationError as err:
            where = f"workflows[{checked.workflows.index(specs[step.name])}]"
            raise InvalidDocument(
                [ValidationError(f"{where}.{err.field}", err.value, err.expected)]
            ) from None
    session.flush()


def _parents_first(steps: list[Step], specs: Mapping[str, TaskCreate]) -> list[Step]:
    """The task steps with each task after the document's tasks it runs after (a task is
    saved only once its parents exist); a cycle keeps its order and is refused at save."""
    left = list(steps)
    placed: set[str] = set()
    out: list[Step] = []
    while left:
        ready = [
            step
            for step in left
            if step.name not in specs
            or all(e.task in placed or e.task not in specs for e in specs[step.name].after or [])
        ]
        if not ready:
            ready = left[:1]
        for step in ready:
            placed.add(step.name)
            left.remove(step)
        out += ready
    return out


def _one(session: Session, table: type[Any], where: Any, step: Step) -> Any:
    row = session.scalar(select(table).where(where))
    if row is None:
        raise ConflictError(
            f"{step.kind.replace('_', ' ')} {step.name!r} was changed meanwhile by someone "
            "else; apply again"
        )
    return row


# --- export ---------------------------------------------------------------------------------


@tasks.storage_errors("export the tasks")
def export_document(
    session: Session,
    *,
    task_ids: list[int] | None = None,
    node_groups: list[str] | None = None,
) -> dict[str, Any]:
    """The document describing the manager's node groups, tasks and workflows (all of them,
    or the tasks named by id and those of the groups named, with their groups and the
    workflows all of whose tasks are among them), each with the fields that differ from their
    defaults: `apply` takes it back unchanged."""
    query = select(Task).order_by(Task.name)
    if task_ids or node_groups:
        picked = []
        if task_ids:
            picked.append(Task.id.in_(task_ids))
        if node_groups:
            picked.append(Task.node_group.in_(node_groups))
        query = query.where(or_(*picked))
    chosen = list(session.scalars(query))
    missing_ids = set(task_ids or ()) - {t.id for t in chosen}
    if missing_ids:
        raise NotFoundError(f"task {', '.join(map(str, sorted(missing_ids)))} does not exist")
    group_query = select(NodeGroup).order_by(NodeGroup.name)
    if task_ids or node_groups:
        wanted = {t.node_group for t in chosen} | set(node_groups or ())
        group_query = group_query.where(NodeGroup.name.in_(wanted))
    groups = list(session.scalars(group_query))
    missing_groups = set(node_groups or ()) - {g.name for g in groups}
    if missing_groups:
        raise NotFoundError(f"node group {', '.join(sorted(missing_groups))} does not exist")
    return {
        "node_groups": [
            _non_default(NodeGroupCreate, {"name": g.name, "description": g.description})
            for g in groups
        ],
        "tasks": [_task_document(t) for t in chosen],
        "workflows": _workflow_documents(session, {t.name for t in chosen}),
    }


def _workflow_documents(session: Session, exported: set[str]) -> list[dict[str, Any]]:
    """The workflows whose tasks are all in `exported` (a file that names its tasks)."""
    out = []
    for wf in workflow_store.list_workflows(session):
        values = workflow_store.definition(session, wf)
        # A workflow left with no task (all deleted) is no valid entry: it is not written.
        if values["tasks"] and set(values["tasks"]) <= exported:
            doc = _non_default(WorkflowCreate, values)
            doc["tasks"] = values["tasks"]  # always written (never a default)
            out.append(doc)
    return out


def _task_document(task: Task) -> dict[str, Any]:
    out = _non_default(TaskCreate, versions.definition(task))
    payload_model = PAYLOAD_MODELS[TaskType(task.task_type)]
    out["payload"] = _non_default(payload_model, task.payload)
    return out


def _non_default(model: type[BaseModel], values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` (a valid instance of `model`, as JSON) without the fields at their default."""
    instance = model.model_validate(dict(values))
    return instance.model_dump(mode="json", exclude_defaults=True)
