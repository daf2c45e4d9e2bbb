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
  POST /api/v1/nodes/heartbeat       Heartbeat   -> 200
  POST /api/v1/job-logs/{id}/result  JobResultReport -> 200 (idempotent: a second report of a
                                     finished run is accepted and ignored)
  POST /api/v1/job-logs/results      ResultBatch -> 200 ResultBatchAnswer: one answer per
                                     result, each the status code the single route would
                                     have given (200 stored or duplicate, 404, 422); a node
                                     sends the results it has ready together

A job is identified everywhere by its job-log id: a node that is handed an id it has already
run or is running answers 202 with duplicate=true and does not run it again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

API = "/api/v1"
OUTPUT_NEXT_HEADER = "X-Ays-Output-Next"
RUN_STATE_HEADER = "X-Ays-Run-State"
# Who makes a change through the manager's API (the CLI sends user@host), kept in task history.
ACTOR_HEADER = "X-Ays-Actor"


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RunRequest(_Message):
    job_log_id: int
    task_id: int
    task_name: str = ""
    task_type: str
    payload: dict[str, Any]
    timeout_s: float = 0
    params: str = ""
    attempt: int = 0
    shard_index: int = 0
    shard_total: int = 1
    scheduled_at: datetime
    block_strategy: str = "serial"
    # False for failover routing: a full node answers 429 instead of queueing the job.
    queue_if_busy: bool = True
    # Where to report the result: the manager's base URL, e.g. http://127.0.0.1:18080
    report_to: str


class RunAccepted(_Message):
    job_log_id: int
    duplicate: bool = False


class RunBatch(_Message):
    runs: list[RunRequest]


class RunAnswer(_Message):
    """What became of one run of a batch: 202 taken (perhaps a duplicate), else refused."""

    job_log_id: int
    status_code: int
    duplicate: bool = False
    detail: str = ""


class RunBatchAnswer(_Message):
    runs: list[RunAnswer]


class JobResultReport(_Message):
    job_log_id: int
    node: str  # ip:port of the node that ran it
    status: str  # a final RunStatus value
    exit_code: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    output: str = ""  # the excerpt (bounded by the env's job_log.excerpt_bytes)
    output_truncated: bool = False
    message: str = ""


class ResultBatch(_Message):
    results: list[JobResultReport]


class ResultAnswer(_Message):
    job_log_id: int
    status_code: int
    stored: bool = False
    detail: str = ""


class ResultBatchAnswer(_Message):
    results: list[ResultAnswer]


class Heartbeat(_Message):
    ip: str
    port: int = Field(ge=1, le=65535)
    node_group: str
    version: str = ""
    running_jobs: int = 0
    max_concurrent_jobs: int = 0


class NodeHealth(_Message):
    status: str = "ok"
    address: str
    node_group: str
    version: str
    running_jobs: int
    draining: bool = False
