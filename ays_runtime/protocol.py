"""The JSON messages between the manager and the nodes (built-in registry and transport).

Node API (every call but health needs `Authorization: Bearer <access token>`):
  POST /api/v1/jobs                  RunRequest  -> 202 RunAccepted; 429 when full and the
                                     request says not to queue (failover tries another node)
  POST /api/v1/jobs/batch            RunBatch    -> 200 RunBatchAnswer: one answer per run,
                                     each what POST /jobs would have said (status_code 202,
                                     or the refusal's code and detail); the manager sends a
                                     burst of runs for one node in one request
  POST /api/v1/jobs/{job_log_id}/kill           -> 200 {"killed": bool}
  GET  /api/v1/jobs/{job_log_id}/output         -> 200 text/plain (full captured output)
       ...?offset=N                              -> 200 the bytes after stream position N,
                                     headers X-Ays-Output-Next (ask from there next time)
                                     and X-Ays-Run-State (waiting, running, finished);
                                     the manager follows a running job's output with it
  GET  /api/v1/health                           -> 200 NodeHealth (no token: Consul checks it)

Manager API used by nodes:
  POST /api/v1/nodes/heartbeat       Heartbeat   -> 200 HeartbeatAnswer (the live managers,
                                     which the node may beat and report to as well); a beat
                                     with state leaving takes the node out of routing at once
                                     (it is stopping: it finishes its runs), offline says it
                                     has left
  POST /api/v1/job-logs/{id}/result  JobResultReport -> 200 (idempotent: a second report of a
                                     finished run is accepted and ignored)
  POST /api/v1/job-logs/results      ResultBatch -> 200 ResultBatchAnswer: one answer per
                                     result, each the status code the single route would
                                     have given (200 stored or duplicate, 404, 422; 503 the
                                     database failed, send it again); each result is checked
                                     on its own, so one bad result never refuses the others;
                                     a node sends the results it has ready together (a batch
                                     refused as too large, 413, one by one)

  POST /api/v1/job-logs/claims       StartClaims -> 200 StartClaimAnswers: before it starts a
                                     run, a node asks the manager to record that it runs it
                                     (compare-and-set: pending/dispatched -> running, with the
                                     node and start time); one answer per run: claimed, or
                                     not (another node holds it, or it has ended) - then the
                                     node does not run it. Runs starting together share a
                                     request (and a transaction)

A job is identified everywhere by its job-log id: a node that is handed an id it has already
run or is running answers 202 with duplicate=true and does not run it again, and a copy of
a run that another node has claimed is not run at all (whatever the transport delivered).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field

from ays_runtime.config import check_ip
from ays_runtime.web.fields import Id, Int32, NonNegativeInt32, StorableText, UtcIn

API = "/api/v1"
# A result batch holds at most this many results (a node sends up to 100 at a time).
MAX_RESULTS_PER_BATCH = 1000
# A job's result (the JSON its shell job wrote to AYS_RESULT_FILE), and all of a child's
# parents' results together (AYS_PARENT_RESULTS): bounded, as they travel with every run.
MAX_JOB_RESULT_BYTES = 65_536
MAX_PARENT_RESULTS_BYTES = 1_048_576
OUTPUT_NEXT_HEADER = "X-Ays-Output-Next"
RUN_STATE_HEADER = "X-Ays-Run-State"
# Who makes a change through the manager's API (the CLI sends user@host), kept in task history.
ACTOR_HEADER = "X-Ays-Actor"


class _Message(StorableText):
    model_config = ConfigDict(extra="ignore", strict=True)


class RunRequest(_Message):
    job_log_id: Id
    task_id: Id
    task_name: str = Field("", max_length=128)
    task_type: str = Field(max_length=16)
    payload: dict[str, Any]
    timeout_s: float = Field(0, ge=0, le=2**31 - 1, allow_inf_nan=False)
    params: str = Field("", max_length=1024)
    attempt: NonNegativeInt32 = 0
    shard_index: NonNegativeInt32 = 0
    shard_total: Annotated[int, Field(ge=1, le=2**31 - 1)] = 1
    scheduled_at: UtcIn
    block_strategy: str = Field("serial", max_length=32)
    # False for failover routing: a full node answers 429 instead of queueing the job.
    queue_if_busy: bool = True
    # Where to report the result: the manager's base URL, e.g. http://127.0.0.1:18080
    report_to: str = Field(max_length=2048)
    # The parents' results, a JSON object keyed by parent task name (ays_runtime.dependencies)
    parent_results: str = Field("", max_length=MAX_PARENT_RESULTS_BYTES)


class RunAccepted(_Message):
    job_log_id: Id
    duplicate: bool = False


class RunBatch(_Message):
    runs: list[RunRequest] = Field(max_length=10_000)


class RunAnswer(_Message):
    """What became of one run of a batch: 202 taken (perhaps a duplicate), else refused."""

    job_log_id: Id
    status_code: int
    duplicate: bool = False
    detail: str = ""


class RunBatchAnswer(_Message):
    runs: list[RunAnswer]


class JobResultReport(_Message):
    job_log_id: Id
    node: str = Field(max_length=64)  # ip:port of the node that ran it
    status: str = Field(max_length=16)  # a final RunStatus value
    exit_code: Int32 | None = None
    started_at: UtcIn | None = None
    ended_at: UtcIn | None = None
    # The excerpt (bounded by the env's job_log.excerpt_bytes; longer is cut to its end).
    output: str = Field("", max_length=1_048_576)
    output_truncated: bool = False
    message: str = Field("", max_length=65_536)  # stored cut to 1024 characters
    # What the job wrote to AYS_RESULT_FILE: valid JSON, or "" for nothing.
    result: str = Field("", max_length=MAX_JOB_RESULT_BYTES)


class ResultBatch(_Message):
    results: list[dict[str, Any]] = Field(
        max_length=MAX_RESULTS_PER_BATCH,
        description="each a JobResultReport (as POST /job-logs/{id}/result takes), checked on "
        "its own: a bad one gets its own answer (422), the others are stored",
    )


class ResultAnswer(_Message):
    job_log_id: int | None = Field(description="None for a result without a usable id")
    status_code: int
    stored: bool = False
    detail: str = ""


class ResultBatchAnswer(_Message):
    results: list[ResultAnswer]


# Runs in one claim request (a node sends the runs starting at once together).
MAX_CLAIMS_PER_REQUEST = 1000


class StartClaims(_Message):
    node: str = Field(max_length=64, description="ip:port of the node about to start the runs")
    job_log_ids: list[Id] = Field(min_length=1, max_length=MAX_CLAIMS_PER_REQUEST)


class StartClaimAnswer(_Message):
    job_log_id: int
    claimed: bool  # True: this node runs it (now recorded as running with it)
    status: str = ""  # the run's status now ("" when the id is unknown)
    node: str = ""  # the node holding the run now


class StartClaimAnswers(_Message):
    claims: list[StartClaimAnswer]


class Heartbeat(_Message):
    ip: Annotated[str, Field(max_length=45), AfterValidator(check_ip)]
    port: int = Field(ge=1, le=65535)
    node_group: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    version: str = Field("", max_length=32)
    running_jobs: NonNegativeInt32 = 0
    max_concurrent_jobs: NonNegativeInt32 = 0
    # online: takes runs; leaving: stopping cleanly, takes no new runs but still finishes and
    # reports its own; offline: stopped (its last word). A manager of an older version
    # ignores it.
    state: Literal["online", "leaving", "offline"] = "online"
    # The node's load when it beat (psutil; the console's nodes page and GET /api/v1/nodes
    # show it). Optional: a node of an older version sends none and is still taken.
    load_1m: float | None = Field(
        None, ge=0, le=1e6, allow_inf_nan=False, description="1-minute load average"
    )
    cpu_count: int | None = Field(None, ge=1, le=1_000_000, description="logical CPUs")
    memory_percent: float | None = Field(
        None, ge=0, le=100, allow_inf_nan=False, description="memory used, %"
    )


class HeartbeatAnswer(_Message):
    status: str = "ok"
    # The managers alive on the database the beat was recorded in, as IP:PORT: a node beats
    # and reports to any of them when the one it uses does not answer.
    managers: list[str] = Field(default_factory=list, max_length=1000)


class Registration(_Message):
    """A node's place in the registry as the node sees it (`NodeMembership.status()`)."""

    registry: str  # the registry backend: builtin or consul
    target: str  # where it registers: the manager's heartbeat URL, or the Consul agent
    state: str  # joining (no answer yet), joined, failing (the last try failed), left
    last_ok_at: datetime | None = None  # the last beat taken, or registration confirmed (UTC)
    failing_since: datetime | None = None  # the first failure of the current outage (UTC)
    last_error: str = ""  # why the last try failed ("" when it did not)


class NodeHealth(_Message):
    status: str = "ok"
    address: str
    node_group: str
    version: str
    running_jobs: int
    draining: bool = False
    uptime_s: float = 0.0
    registration: Registration | None = None
