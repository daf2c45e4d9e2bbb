"""The node's HTTP API (built-in transport): the routes listed in `ays_runtime.protocol`.

`GET /metrics` serves the node's Prometheus metrics (ays_runtime/metrics/node.py).
Every route but health (and the OpenAPI document; /metrics when `metrics.public: true`)
needs the env's cluster secret (`Authorization: Bearer ...` or `X-Ays-Token`): only managers
send jobs, never an operator's token (personal or the shared access token); checked by the guard
in front of the app before any body is read (ays_runtime/web/guard.py); bodies are bounded
by `node.max_body_bytes` (413 past it). Refusals are logged once per caller per minute,
never with the token. Errors are JSON `{"detail": "..."}`. The routes only translate HTTP
to calls on the daemon (`NodeDaemon.accept`, `kill`, `output`, `health`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ays_runtime import __version__
from ays_runtime.auth import Caller, authenticate
from ays_runtime.metrics import base as metrics
from ays_runtime.metrics import node as node_metrics
from ays_runtime.protocol import (
    API,
    OUTPUT_NEXT_HEADER,
    RUN_STATE_HEADER,
    NodeHealth,
    RunAccepted,
    RunAnswer,
    RunBatch,
    RunBatchAnswer,
    RunRequest,
)
from ays_runtime.web.fields import Id, Position, StorableText
from ays_runtime.web.guard import BodyLimit, BodyLimits, PublicRoutes, allowed_methods, protect
from ays_runtime.web.refusals import RefusalLog

if TYPE_CHECKING:
    from ays_runtime.node.daemon import NodeDaemon

log = logging.getLogger("ays.node.api")


class JobRefused(Exception):
    """The node will not take a job now; `status_code` is the HTTP answer (429 full,
    503 stopping, 422 a field the node cannot use), the message says why."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class KillRequest(StorableText):
    model_config = ConfigDict(strict=True)
    reason: str = Field("killed on request", max_length=1024)


class Killed(BaseModel):
    killed: bool


class NodeError(BaseModel):
    detail: str


# The only routes a caller without a token reaches (Consul's health check is one).
PUBLIC = PublicRoutes(paths=frozenset({f"{API}/health", "/openapi.json"}))


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": NodeError} for code in codes}


async def _on_request_invalid(_request: Request, exc: Exception) -> JSONResponse:
    """A validation error as one line naming the field (`detail`), like the node's others."""
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error["loc"][1:]) or "body"
        problems.append(f"{where}: {error['msg']}")
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


def create_app(node: NodeDaemon) -> FastAPI:
    """The node API, answering for `node`."""

    app = FastAPI(title="Ays node", version=__version__, docs_url=None, redoc_url=None)
    # 404 also for a path whose id is not a number: no route has it.
    guarded = APIRouter(prefix=API, responses=_errors(401, 404, 422))

    async def caller(headers: Mapping[str, str]) -> Caller | None:
        # Only managers (and nodes) of this env: the cluster secret, nothing else.
        return await authenticate(headers, "", node.token)

    protect(
        app,
        public=metrics.public_routes(PUBLIC, node.config),
        authenticate=caller,
        limits=BodyLimits(BodyLimit(node.config.node.max_body_bytes, "node.max_body_bytes")),
        refusals=RefusalLog(node.who, log),
        error_key="detail",
    )
    app.add_exception_handler(RequestValidationError, _on_request_invalid)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)

    @guarded.post("/jobs", status_code=202, response_model=RunAccepted, responses=_errors(429, 503))
    async def run_job(request: RunRequest) -> RunAccepted | JSONResponse:
        try:
            return node.accept(request)
        except JobRefused as refused:
            return JSONResponse({"detail": str(refused)}, status_code=refused.status_code)

    @guarded.post("/jobs/batch", response_model=RunBatchAnswer)
    async def run_jobs(batch: RunBatch) -> RunBatchAnswer:
        answers = []
        for request in batch.runs:
            try:
                taken = node.accept(request)
            except JobRefused as refused:
                answers.append(
                    RunAnswer(
                        job_log_id=request.job_log_id,
                        status_code=refused.status_code,
                        detail=str(refused),
                    )
                )
                continue
            answers.append(
                RunAnswer(job_log_id=taken.job_log_id, status_code=202, duplicate=taken.duplicate)
            )
        return RunBatchAnswer(runs=answers)

    @guarded.post("/jobs/{job_log_id:int}/kill", response_model=Killed)
    async def kill_job(job_log_id: Id, body: KillRequest | None = None) -> Killed:
        reason = body.reason if body is not None else KillRequest().reason
        return Killed(killed=await node.kill(job_log_id, reason))

    @guarded.get(
        "/jobs/{job_log_id:int}/output",
        response_class=Response,
        responses={
            **_errors(404),
            200: {
                "content": {
                    "text/plain": {"schema": {"type": "string"}},
                    "application/octet-stream": {"schema": {"type": "string"}},
                },
                "description": "the output (text/plain), or with offset the bytes after it",
            },
        },
    )
    async def job_output(
        job_log_id: Id,
        offset: Annotated[
            Position | None, Query(description="stream position to read from (follow mode)")
        ] = None,
    ) -> Response:
        """The run's captured output. With `offset`, only what follows that stream position,
        with `X-Ays-Output-Next` (the position to ask for next) and `X-Ays-Run-State`
        (waiting, running or finished)."""
        unknown = HTTPException(
            status_code=404,
            detail=f"{node.who}: no output of run {job_log_id} (unknown here, or no longer kept)",
        )
        if offset is None:
            output = node.output(job_log_id)
            if output is None:
                raise unknown
            return Response(output, media_type="text/plain; charset=utf-8")
        chunk = node.output_from(job_log_id, offset)
        if chunk is None:
            raise unknown
        data, following, state = chunk
        return Response(
            data,
            media_type="application/octet-stream",
            headers={OUTPUT_NEXT_HEADER: str(following), RUN_STATE_HEADER: state},
        )

    @app.get(f"{API}/health", response_model=NodeHealth)
    async def health() -> NodeHealth:
        return node.health()

    app.include_router(guarded)
    metrics.add_route(app, node_metrics.REGISTRY)
    node_metrics.attach(node.metrics_state())
    return app
