"""The node's HTTP API (built-in transport): the routes listed in `ays_runtime.protocol`.

Every route but health needs the access token (`Authorization: Bearer ...` or `X-Ays-Token`);
a refusal is a 401 and one log line naming the caller, never the token. The routes only
translate HTTP to calls on the daemon (`NodeDaemon.accept`, `kill`, `output`, `health`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ays_runtime import __version__
from ays_runtime.auth import presented_token, token_matches
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

if TYPE_CHECKING:
    from ays_runtime.node.daemon import NodeDaemon

log = logging.getLogger("ays.node.api")


class JobRefused(Exception):
    """The node will not take a job now; `status_code` is the HTTP answer (429 full,
    503 stopping, 422 a field the node cannot use), the message says why."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class KillRequest(BaseModel):
    reason: str = "killed on request"


class Killed(BaseModel):
    killed: bool


def create_app(node: NodeDaemon) -> FastAPI:
    """The node API, answering for `node`."""

    def require_token(
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
        x_ays_token: Annotated[str | None, Header()] = None,
    ) -> None:
        if token_matches(presented_token(authorization, x_ays_token), node.token):
            return
        client = f"{request.client.host}:{request.client.port}" if request.client else "?"
        log.warning(
            "%s: refused %s %s from %s: bad or missing access token",
            node.who,
            request.method,
            request.url.path,
            client,
        )
        raise HTTPException(
            status_code=401,
            detail="bad or missing access token: send Authorization: Bearer <access token>",
            headers={"WWW-Authenticate": "Bearer"},
        )

    app = FastAPI(title="Ays node", version=__version__, docs_url=None, redoc_url=None)
    guarded = APIRouter(prefix=API, dependencies=[Depends(require_token)])

    @guarded.post("/jobs", status_code=202, response_model=RunAccepted)
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

    @guarded.post("/jobs/{job_log_id}/kill", response_model=Killed)
    async def kill_job(job_log_id: int, body: KillRequest | None = None) -> Killed:
        reason = body.reason if body is not None else KillRequest().reason
        return Killed(killed=await node.kill(job_log_id, reason))

    @guarded.get("/jobs/{job_log_id}/output", response_class=Response)
    async def job_output(
        job_log_id: int,
        offset: Annotated[
            int | None, Query(ge=0, description="stream position to read from (follow mode)")
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
    return app
