"""The bodies of the manager's HTTP API: requests in, responses out (pydantic 2).

Request models forbid unknown fields and carry every type, range and choice check, so the
OpenAPI document states the rules. Checks that need more than one field or the database
(schedule in its time zone, the payload of the task type, an existing node group) live in
`ays_runtime.manager.tasks`, which validates plain dicts with these same models; both paths
report an error as `ValidationError(field, value, expected)` through `field_error`, so a caller
always reads `<field>: <bad value> is not valid: <expected>`.

Datetimes are stored naive UTC; responses send them with their `Z` (`UtcOut`). Integers a
request carries are bounded (ays_runtime/web/fields.py), and a task that could never run is
refused here, naming the field: the shell rules are the executor's own (node/limits.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    Strict,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from ays_runtime.exceptions import ValidationError
from ays_runtime.node import limits
from ays_runtime.storage.models import (
    BlockStrategy,
    MisfirePolicy,
    RetryBackoff,
    RouteStrategy,
    TaskType,
)
from ays_runtime.vocabulary import AfterCondition, AfterMode
from ays_runtime.web.fields import INT32_MAX, StorableText, UtcOut

# Where FastAPI says a request error sits; dropped from the field path we report.
_REQUEST_PARTS = {"body", "query", "path", "header", "cookie"}
# A node group name becomes a Consul service tag and part of a RocketMQ topic name.
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A tag is found by `LIKE '%,tag,%'` (storage.models.TagList): no comma, no capital.
_TAG = re.compile(r"^[a-z0-9_.-]{1,32}$")
MAX_TAGS = 20
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,256}$")  # RFC 9110 token
MAX_HTTP_HEADERS = 100
MAX_HEADER_VALUE = 8192
MAX_URL = 8192
MAX_HTTP_BODY = 262_144  # characters; the whole request is bounded by manager.max_body_bytes
MAX_RETRY_INTERVAL = 604_800.0  # a week
M = TypeVar("M", bound=BaseModel)
HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


# --- errors ---------------------------------------------------------------------------------


def field_error(
    detail: ErrorDetails, prefix: str = "", model: type[BaseModel] | None = None
) -> ValidationError:
    """One pydantic error as our ValidationError: dotted field path, bad value, expectation.

    `prefix` is prepended to the path (`payload` for a payload checked on its own). The
    request part FastAPI puts first (`body`, `query`, `path`) is left out. `model`, when
    known, lends a missing field's description to the message.
    """
    loc = [str(part) for part in detail["loc"]]
    if loc and loc[0] in _REQUEST_PARTS:
        loc = loc[1:]
    kind = detail["type"]
    if kind == "json_invalid":
        # The position in the document is not a field.
        ctx = detail.get("ctx") or {}
        reason = ctx.get("error", "")
        return ValidationError(prefix or "body", None, f"a JSON document ({reason})")
    field = ".".join([prefix, *loc] if prefix else loc) or prefix or "body"
    if kind == "missing":
        known = model.model_fields.get(loc[-1]) if model is not None and loc else None
        hint = f" ({known.description})" if known is not None and known.description else ""
        return ValidationError(field, None, f"required{hint}")
    value = detail.get("input")
    if isinstance(value, bytes):  # a body FastAPI did not parse: not declared as JSON
        value = value.decode("utf-8", errors="replace")
        return ValidationError(field, value, "a JSON object sent as application/json")
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return ValidationError(field, value, "a JSON object")
    message = detail["msg"]
    for noise in ("Input should be ", "Value error, ", "Assertion failed, "):
        if message.startswith(noise):
            message = ("should be " if noise.startswith("Input") else "") + message[len(noise) :]
    return ValidationError(field, value, message)


def validated(model: type[M], data: Any, prefix: str = "") -> M:
    """`model.model_validate(data)`, raising our ValidationError (the first problem found)."""
    try:
        return model.model_validate(data)
    except PydanticValidationError as err:
        raise field_error(err.errors()[0], prefix, model) from None


def every_error(
    model: type[M], data: Any, prefix: str = ""
) -> tuple[M | None, list[ValidationError]]:
    """`model.model_validate(data)` and no error, or None and every problem found."""
    try:
        return model.model_validate(data), []
    except PydanticValidationError as err:
        return None, [field_error(detail, prefix, model) for detail in err.errors()]


# --- request building blocks ----------------------------------------------------------------


class _Request(StorableText):
    """A request body: unknown fields are an error that lists the fields there are."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="wrap")
    @classmethod
    def _name_unknown_fields(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        try:
            return handler(data)
        except PydanticValidationError as err:
            if not any(e["type"] == "extra_forbidden" for e in err.errors()):
                raise
            known = ", ".join(cls.model_fields)
            details: list[InitErrorDetails] = []
            for e in err.errors():
                if e["type"] == "extra_forbidden":
                    kind = PydanticCustomError(
                        "unknown_field",
                        "not a known field; the fields are {known}",
                        {"known": known},
                    )
                    details.append({"type": kind, "loc": e["loc"], "input": e["input"]})
                else:
                    details.append(
                        {
                            "type": e["type"],
                            "loc": e["loc"],
                            "input": e["input"],
                            "ctx": e.get("ctx", {}),
                        }
                    )
            raise PydanticValidationError.from_exception_data(err.title, details) from None


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _group_name(value: str) -> str:
    if not _GROUP_NAME.match(value):
        raise ValueError("1-64 letters, digits, '_' or '-' (e.g. node_group_ksa)")
    return value


def tag_name(value: str) -> str:
    if not _TAG.match(value):
        raise ValueError("1-32 lowercase letters, digits, '_', '.' or '-' (e.g. billing)")
    return value


def _tag_set(tags: list[str]) -> list[str]:
    unique = sorted(set(tags))
    if len(unique) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} different tags")
    return unique


def _http_url(value: str) -> str:
    if any(ord(c) <= 32 or ord(c) == 127 for c in value):
        raise ValueError("a URL without spaces or control characters (percent-encode them)")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        parts = urlsplit("")
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("an http:// or https:// URL with a host, e.g. https://example.com/hook")
    return value


def _http_headers(headers: dict[str, str]) -> dict[str, str]:
    if len(headers) > MAX_HTTP_HEADERS:
        raise ValueError(f"at most {MAX_HTTP_HEADERS} headers")
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise ValueError(f"{name!r} is not a header name (letters, digits, !#$%&'*+-.^_`|~)")
        if any(c in value for c in "\r\n\0") or len(value) > MAX_HEADER_VALUE:
            raise ValueError(
                f"{name}: a header value is one line of at most {MAX_HEADER_VALUE} characters, "
                "without a NUL"
            )
    return headers


def _workdir(value: str | None) -> str | None:
    return None if value is None else limits.check_workdir(value)


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


TaskName = Annotated[
    str,
    Field(min_length=1, max_length=128, description="unique name of the task"),
    AfterValidator(_not_blank),
]
Description = Annotated[str, Field(max_length=255, description="free text")]
GroupRef = Annotated[
    str,
    Field(min_length=1, max_length=64, description="an existing node group (POST /node-groups)"),
]
GroupName = Annotated[
    str,
    Field(description="1-64 letters, digits, '_' or '-'", examples=["node_group_ksa"]),
    AfterValidator(_group_name),
]
ScheduleText = Annotated[
    str,
    Field(
        max_length=255,
        description="6-field cron, seconds first (`*/10 * * * * *`), 5-field cron (minute "
        "granularity), `@every 10s`, or @hourly/@daily/@weekly/@monthly/@yearly; empty for "
        "a task fired only by its parents (`after`), its workflow, or by hand",
        examples=["0 */5 * * * *"],
    ),
]
TimezoneName = Annotated[
    str, Field(min_length=1, max_length=64, description="IANA time zone the cron runs in")
]
Params = Annotated[
    str,
    Field(max_length=1024, description="handed to the job (env AYS_PARAMS / body); no NUL"),
    AfterValidator(limits.check_text),
]
TagName = Annotated[str, AfterValidator(tag_name)]
Tags = Annotated[
    list[TagName],
    Field(
        description=f"at most {MAX_TAGS} labels to find the task by (GET /tasks?tag=), each "
        "1-32 of a-z 0-9 _ . -; duplicates dropped, kept sorted",
        examples=[["billing", "nightly"]],
    ),
    AfterValidator(_tag_set),
]
TimeoutS = Annotated[
    int, Field(ge=0, le=INT32_MAX, description="seconds a run may take; 0 = no timeout")
]
RetryCount = Annotated[int, Field(ge=0, le=100, description="retries after a failed run")]
RetryInterval = Annotated[
    float,
    Field(
        gt=0,
        le=MAX_RETRY_INTERVAL,
        allow_inf_nan=False,
        description="seconds before the first retry (at most a week)",
    ),
]


class ShellPayload(_Request):
    """What a shell task runs: `command` through /bin/sh, in its own process group. What exec
    cannot take is refused: a NUL byte, a command over 128 KiB, a bad variable name."""

    command: Annotated[
        str,
        Field(min_length=1, max_length=limits.MAX_ARG_BYTES),
        AfterValidator(_not_blank),
        AfterValidator(limits.check_command),
    ] = Field(description="shell command line (at most 131071 bytes of UTF-8)")
    env: Annotated[dict[str, str], AfterValidator(limits.check_env)] = Field(
        default_factory=dict,
        description="extra environment: names of letters, digits and _, values without NUL",
    )
    workdir: Annotated[
        str | None, Field(max_length=limits.PATH_MAX_BYTES), AfterValidator(_workdir)
    ] = Field(None, description="absolute working directory (default: the node user's home)")

    @model_validator(mode="after")
    def _fits_exec(self) -> ShellPayload:
        limits.check_exec_size(self.command, self.env)
        return self


class HttpPayload(_Request):
    """What an http task calls."""

    url: Annotated[str, Field(max_length=MAX_URL), AfterValidator(_http_url)] = Field(
        description="http(s) URL to call"
    )
    method: Annotated[HttpMethod, BeforeValidator(_upper)] = "GET"
    headers: Annotated[dict[str, str], AfterValidator(_http_headers)] = Field(
        default_factory=dict, description="at most 100, each value one line"
    )
    body: str = Field("", max_length=MAX_HTTP_BODY)
    expected_status: int | None = Field(
        None, ge=100, le=599, description="the status that means success (default: any 2xx)"
    )


PAYLOAD_MODELS: dict[TaskType, type[_Request]] = {
    TaskType.SHELL: ShellPayload,
    TaskType.HTTP: HttpPayload,
}


# --- dependencies ---------------------------------------------------------------------------

MAX_PARENTS = 1000


def _none_is_empty(value: Any) -> Any:
    return [] if value is None else value


class ParentEdge(_Request):
    """One parent of a task (`ays_runtime.dependencies`)."""

    task: TaskName = Field(description="the parent task's name")
    condition: Annotated[AfterCondition, Strict(False)] = Field(
        AfterCondition.SUCCESS,
        description="success, failure or always: which end of the parent's run fires this task",
    )


After = Annotated[
    list[ParentEdge] | None,
    BeforeValidator(_none_is_empty),
    Field(
        max_length=MAX_PARENTS,
        description="parent tasks: this task fires when their runs end (see after_mode)",
        examples=[[{"task": "extract", "condition": "success"}]],
    ),
]
AfterModeField = Annotated[
    AfterMode,
    Strict(False),
    Field(
        description="all: once per slot, when every parent's run of that slot met its "
        "condition (else the slot is skipped); any: once per parent run that met it"
    ),
]


# --- task requests --------------------------------------------------------------------------


class TaskCreate(_Request):
    name: TaskName
    description: Description = ""
    node_group: GroupRef
    schedule: ScheduleText = ""
    timezone: TimezoneName = "UTC"
    task_type: Annotated[TaskType, Strict(False)] = TaskType.SHELL
    payload: dict[str, Any] = Field(
        description="shell: {command, env?, workdir?}; "
        "http: {url, method?, headers?, body?, expected_status?}",
        examples=[{"command": "echo hello"}],
    )
    params: Params = ""
    timeout_s: TimeoutS = 0
    retry_count: RetryCount = 0
    retry_backoff: Annotated[RetryBackoff, Strict(False)] = RetryBackoff.FIXED
    retry_interval_s: RetryInterval = 10.0
    allow_concurrent_retry: bool = Field(
        False,
        description="retry a run whose node was lost at once, although its old process may "
        "still run there (default: the retry waits until the node reports the run ended, or "
        "until the run's timeout has passed)",
    )
    route_strategy: Annotated[RouteStrategy, Strict(False)] = RouteStrategy.FIRST
    block_strategy: Annotated[BlockStrategy, Strict(False)] = BlockStrategy.SERIAL
    misfire_policy: Annotated[MisfirePolicy, Strict(False)] = MisfirePolicy.SKIP
    enabled: bool = True
    tags: Tags = Field(default_factory=list)
    after: After = Field(default_factory=list)
    after_mode: AfterModeField = AfterMode.ALL


class TaskUpdate(_Request):
    """Any subset of the task's fields; the others keep their values (PUT and PATCH alike)."""

    name: TaskName | None = None
    description: Description | None = None
    node_group: GroupRef | None = None
    schedule: ScheduleText | None = None
    timezone: TimezoneName | None = None
    task_type: Annotated[TaskType, Strict(False)] | None = None
    payload: dict[str, Any] | None = None
    params: Params | None = None
    timeout_s: TimeoutS | None = None
    retry_count: RetryCount | None = None
    retry_backoff: Annotated[RetryBackoff, Strict(False)] | None = None
    retry_interval_s: RetryInterval | None = None
    allow_concurrent_retry: bool | None = None
    route_strategy: Annotated[RouteStrategy, Strict(False)] | None = None
    block_strategy: Annotated[BlockStrategy, Strict(False)] | None = None
    misfire_policy: Annotated[MisfirePolicy, Strict(False)] | None = None
    enabled: bool | None = None
    tags: Tags | None = None
    after: After = None
    after_mode: AfterModeField | None = None


class WorkflowCreate(_Request):
    """A workflow: a named set of tasks started together (`ays_runtime.workflows`)."""

    name: TaskName = Field(description="unique name of the workflow")
    description: Description = ""
    tasks: list[TaskName] = Field(
        min_length=1,
        max_length=MAX_PARENTS,
        description="its tasks, by name; their `after` are its edges",
    )
    schedule: ScheduleText = ""
    timezone: TimezoneName = "UTC"
    params: Params = Field("", description="handed to every task of a run (AYS_PARAMS)")
    timeout_s: TimeoutS = Field(0, description="a run still running after this is ended")
    enabled: bool = True


class WorkflowUpdate(_Request):
    name: TaskName | None = None
    description: Description | None = None
    tasks: list[TaskName] | None = Field(None, min_length=1, max_length=MAX_PARENTS)
    schedule: ScheduleText | None = None
    timezone: TimezoneName | None = None
    params: Params | None = None
    timeout_s: TimeoutS | None = None
    enabled: bool | None = None


class WorkflowStart(_Request):
    params: Params | None = Field(None, description="replaces the workflow's params this run")


class TriggerRequest(_Request):
    params: Params | None = Field(None, description="replaces the task's params for this run")


class RollbackRequest(_Request):
    version: int = Field(
        ge=1, le=INT32_MAX, description="the version whose definition is written back"
    )


class KillRequest(_Request):
    reason: str = Field(
        "killed by operator", max_length=512, description="recorded in the run's message"
    )


class NodeGroupCreate(_Request):
    name: GroupName
    description: Description = ""


class NodeGroupUpdate(_Request):
    """A new name (tasks and nodes of the group follow it) and/or a new description."""

    name: GroupName | None = None
    description: Description | None = None


class TasksDocument(_Request):
    """Tasks as code: the node groups, tasks and workflows a manager should have, each by its
    name. A field left out means its default. `POST /apply` takes it; `GET /export` writes it."""

    # null (a YAML key with nothing under it) means none: the document says so too.
    node_groups: Annotated[list[dict[str, Any]] | None, BeforeValidator(_none_is_empty)] = Field(
        default_factory=list, description="each {name, description?}"
    )
    tasks: Annotated[list[dict[str, Any]] | None, BeforeValidator(_none_is_empty)] = Field(
        default_factory=list, description="each the fields of POST /tasks"
    )
    workflows: Annotated[list[dict[str, Any]] | None, BeforeValidator(_none_is_empty)] = Field(
        default_factory=list,
        description="each the fields of POST /workflows; applied after the tasks",
    )


# --- responses ------------------------------------------------------------------------------


class _Response(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class TaskOut(_Response):
    id: int
    name: str
    description: str
    node_group: str
    schedule: str
    timezone: str
    task_type: str
    payload: dict[str, Any]
    params: str
    timeout_s: int
    retry_count: int
    retry_backoff: str
    retry_interval_s: float
    allow_concurrent_retry: bool
    route_strategy: str
    block_strategy: str
    misfire_policy: str
    enabled: bool
    tags: list[str]
    after: Annotated[list[dict[str, str]], BeforeValidator(_none_is_empty)] = Field(
        default_factory=list, description="parent tasks, each {task, condition}"
    )
    after_mode: str = AfterMode.ALL.value
    after_problems: list[str] = Field(
        default_factory=list, description="parents deleted or disabled (they will not fire it)"
    )
    version: int = Field(description="bumped on every change")
    created_at: UtcOut
    updated_at: UtcOut


class TaskPage(BaseModel):
    items: list[TaskOut]
    total: int = Field(description="matching tasks, all pages")


class TaskVersionOut(BaseModel):
    task_id: int | None = Field(description="null once the task was deleted")
    version: int
    name: str = Field(description="the task's name at this version")
    change: str = Field(description="created, updated, deleted, or baseline (history began)")
    changed_by: str = Field(description="who: 'token', or the name a caller gave with it")
    via: str = Field(description="api, console, apply, rollback, or migration")
    changed_at: UtcOut
    changed_fields: list[str] = Field(description="the fields this version changed")
    definition: dict[str, Any] = Field(description="the task's definition at this version")


class TaskVersionList(BaseModel):
    items: list[TaskVersionOut] = Field(description="newest first")
    total: int


class JobLogOut(_Response):
    id: int
    task_id: int
    scheduled_at: UtcOut
    trigger: str
    attempt: int
    shard_index: int
    shard_total: int
    params: str
    claim: str
    manager_id: str
    node: str
    status: str
    created_at: UtcOut
    started_at: UtcOut | None
    ended_at: UtcOut | None
    due_at: UtcOut | None = Field(
        None,
        description="when a pending run may be dispatched: a retry once its backoff has "
        "passed, a run claimed ahead (manager.claim_ahead) at its slot",
    )
    exit_code: int | None
    output: str
    message: str
    result: str | None = Field(
        None, description="the JSON the job wrote to AYS_RESULT_FILE (its children get it)"
    )


class JobLogPage(BaseModel):
    items: list[JobLogOut]
    total: int


class NodeOut(_Response):
    id: int
    ip: str
    port: int
    address: str = Field(description="ip:port")
    node_group: str
    status: str
    source: str
    version: str
    running_jobs: int
    load_1m: float | None = Field(
        None, description="1-minute load average at its last heartbeat (null: none reported)"
    )
    cpu_count: int | None = Field(None, description="logical CPUs, as its heartbeat said")
    memory_percent: float | None = Field(None, description="memory used, % (last heartbeat)")
    last_seen: UtcOut | None
    created_at: UtcOut
    updated_at: UtcOut


class NodePage(BaseModel):
    items: list[NodeOut]
    total: int


class NodeGroupOut(_Response):
    id: int
    name: str
    description: str
    auto_created: bool = Field(
        description="created when a node joined it, not by POST /api/v1/node-groups"
    )
    created_at: UtcOut
    updated_at: UtcOut


class NodeGroupList(BaseModel):
    items: list[NodeGroupOut]
    total: int


class TriggerResponse(BaseModel):
    job_log_id: int = Field(description="the job log of the run just fired")


class KillResponse(BaseModel):
    job_log_id: int
    killed: bool = Field(description="the run ended as killed by this request")
    status: str = Field(description="the run's status now")
    detail: str = Field(description="where and how it ended")


class RunOutputOut(BaseModel):
    """A piece of a run's output (manager/output.py): ask again from `next` for what follows."""

    job_log_id: int
    status: str = Field(description="the run's status now")
    node: str = Field(description="ip:port of the node holding the run, or empty")
    offset: int = Field(description="the position asked for")
    next: int = Field(description="the position to ask for next")
    text: str = Field(description="the output from offset to next (UTF-8)")
    complete: bool = Field(description="the run has ended and nothing more will come")
    source: Literal["node", "job_log", "none"] = Field(
        description="node: live (or kept) on the node, offsets count the whole output's "
        "bytes; job_log: the stored excerpt (the end of the output), offsets count its "
        "bytes; none: nothing yet"
    )
    exit_code: int | None = None
    message: str = ""


class FieldChangeOut(BaseModel):
    field: str
    old: Any
    new: Any


class PlanStepOut(BaseModel):
    kind: Literal["node_group", "task", "workflow"]
    name: str
    action: Literal["create", "update", "delete", "unchanged"]
    changes: list[FieldChangeOut] = Field(description="an update's changes, field by field")


class ApplyResult(BaseModel):
    applied: bool = Field(description="the changes were made (false: a dry run, or none)")
    dry_run: bool
    prune: bool
    steps: list[PlanStepOut] = Field(
        description="node groups, then tasks, in the document's order; deletions last"
    )
    created: int
    updated: int
    deleted: int
    unchanged: int
    kept_node_groups: list[str] = Field(
        description="named by the manager, not by the document: kept (prune deletes them)"
    )
    kept_tasks: list[str] = Field(description="likewise")
    kept_workflows: list[str] = Field(default_factory=list, description="likewise")


class ReconcileResult(BaseModel):
    manager_id: str
    actions: list[str] = Field(description="what this reconcile did, one line each")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    manager_id: str
    version: str
    uptime_s: float


class ErrorOut(BaseModel):
    """Every 4xx body. Validation errors also name the field and the bad value."""

    error: str
    field: str | None = None
    value: Any = None
    errors: Sequence[dict[str, Any]] | None = Field(
        None, description="validation: every problem found, each {field, value, error}"
    )


class WorkflowOut(_Response):
    id: int
    name: str
    description: str
    tasks: list[str]
    schedule: str
    timezone: str
    params: str
    timeout_s: int
    enabled: bool
    created_at: UtcOut
    updated_at: UtcOut


class WorkflowNodeOut(BaseModel):
    task: str
    task_id: int
    depth: int = Field(description="0 for a first task; a child is below its deepest parent")
    parents: list[str] = Field(description="its parents inside the workflow")
    status: str = Field(description="its last attempt's run status, or not_run")
    job_log_id: int | None
    attempt: int | None
    node: str = Field(description="the node that ran it")
    message: str


class WorkflowRunOut(BaseModel):
    id: int
    workflow: str
    scheduled_at: UtcOut = Field(description="the slot every task of the run has")
    trigger: str
    params: str
    status: str = Field(description="running, succeeded, failed or partly_skipped")
    message: str
    started_at: UtcOut
    deadline_at: UtcOut | None
    ended_at: UtcOut | None
    nodes: list[WorkflowNodeOut] = Field(default_factory=list)


class WorkflowView(BaseModel):
    workflow: WorkflowOut
    latest_run: WorkflowRunOut | None
    runs: list[WorkflowRunOut] = Field(description="the latest runs, newest first")
