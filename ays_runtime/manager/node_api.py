"""Manager routes about nodes: heartbeats, start claims and results from nodes, manual add
and remove.

The guard in front of the app (ays_runtime/web/guard.py) has checked the token before any of
these runs. A batch of results is checked result by result: a bad one is answered 422 on its
own (the node drops it), the others are stored.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from functools import partial
from typing import Any

import pydantic
from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import ConfigDict, Field, field_validator
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ays_runtime.audit import trail
from ays_runtime.audit.api import Who
from ays_runtime.exceptions import RegistryError
from ays_runtime.manager.runs import RunTracker
from ays_runtime.manager.schemas import ErrorOut, field_error
from ays_runtime.protocol import (
    API,
    Heartbeat,
    HeartbeatAnswer,
    JobResultReport,
    ResultAnswer,
    ResultBatch,
    ResultBatchAnswer,
    StartClaimAnswers,
    StartClaims,
)
from ays_runtime.registry.base import NodeRegistry, ensure_node_groups
from ays_runtime.registry.builtin import BuiltinRegistry
from ays_runtime.storage.database import in_session, utcnow
from ays_runtime.storage.models import JobLog, Node, NodeGroup, NodeSource, NodeStatus, RunStatus
from ays_runtime.vocabulary import AuditAction
from ays_runtime.web.fields import Id, StorableText
from ays_runtime.web.refusals import RefusalLog

log = logging.getLogger("ays.api")

_FINAL_STATUSES = {s.value for s in RunStatus if s.is_final}


class NodeAdd(StorableText):
    model_config = ConfigDict(extra="forbid", strict=True)
    ip: str = Field(max_length=45)
    port: int = Field(ge=1, le=65535)
    node_group: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address") from None


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorOut} for code in codes}


def node_router(
    engine_sessions,  # noqa: ANN001 - sessionmaker
    tracker: RunTracker,
    registry: BuiltinRegistry | None,
    manager_id: str,
    node_list: NodeRegistry | None = None,
) -> APIRouter:
    """`node_list`: the registry whose own node list (Consul KV) manual adds and removes are
    written to, before the database row (nothing is written when it refuses)."""
    router = APIRouter(prefix=API, responses=_errors(401, 422, 503))

    @router.post("/nodes/heartbeat", tags=["nodes"], responses=_errors(409))
    async def heartbeat(beat: Heartbeat) -> HeartbeatAnswer:
        if registry is None:
            raise HTTPException(409, "this environment's registry is not builtin: no heartbeats")
        await run_in_threadpool(registry.record_heartbeat, beat)
        return HeartbeatAnswer(managers=registry.live_managers)

    def missing(job_log_ids: list[int]) -> set[int]:
        if not job_log_ids:
            return set()
        with engine_sessions() as s:
            found = s.scalars(select(JobLog.id).where(JobLog.id.in_(job_log_ids)))
            return set(job_log_ids) - set(found)

    async def store(items: list[dict[str, Any]]) -> list[ResultAnswer]:
        """Check each result on its own, store the valid ones (together: one transaction);
        an answer per result, in order."""
        answers: list[ResultAnswer | None] = [None] * len(items)
        valid: list[tuple[int, JobResultReport]] = []
        for i, item in enumerate(items):
            try:
                report = JobResultReport.model_validate(item)
            except pydantic.ValidationError as err:
                detail = str(field_error(err.errors()[0], model=JobResultReport))
                answers[i] = ResultAnswer(
                    job_log_id=_result_id(item), status_code=422, detail=detail
                )
                continue
            if report.status not in _FINAL_STATUSES:
                detail = f"status: {report.status!r} is not a final run status"
                answers[i] = ResultAnswer(
                    job_log_id=report.job_log_id, status_code=422, detail=detail
                )
                continue
            valid.append((i, report))
        outcomes = await asyncio.gather(
            *(tracker.record_result(r) for _, r in valid), return_exceptions=True
        )
        # Only a report that changed nothing needs the second look: a duplicate is fine, an
        # unknown id is a 404 so the node stops resending it.
        unchanged = [
            r.job_log_id for (_, r), done in zip(valid, outcomes, strict=True) if done is False
        ]
        try:
            unknown = await run_in_threadpool(missing, unchanged)
        except SQLAlchemyError as err:
            unknown, outcomes = set(), [err] * len(outcomes)
        for (i, report), outcome in zip(valid, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.error(
                    "manager %s: storing the result of run %d failed: %s; the node sends it again",
                    manager_id,
                    report.job_log_id,
                    outcome,
                )
                answers[i] = ResultAnswer(
                    job_log_id=report.job_log_id,
                    status_code=503,
                    detail="the database failed; send it again",
                )
            elif report.job_log_id in unknown:
                answers[i] = ResultAnswer(
                    job_log_id=report.job_log_id,
                    status_code=404,
                    detail=f"job log {report.job_log_id} does not exist",
                )
            else:
                answers[i] = ResultAnswer(
                    job_log_id=report.job_log_id, status_code=200, stored=outcome
                )
        return [answer for answer in answers if answer is not None]

    @router.post("/job-logs/{job_log_id:int}/result", tags=["job-logs"], responses=_errors(404))
    async def result(job_log_id: Id, report: JobResultReport) -> dict[str, bool]:
        if report.job_log_id != job_log_id:
            raise HTTPException(
                422, f"job_log_id: body says {report.job_log_id}, path {job_log_id}"
            )
        (answer,) = await store([report.model_dump(mode="json")])
        if answer.status_code != 200:
            raise HTTPException(answer.status_code, answer.detail)
        return {"stored": answer.stored}

    @router.post("/job-logs/claims", tags=["job-logs"])
    async def claims(claims: StartClaims) -> StartClaimAnswers:
        """A node about to start runs: each is claimed for it (then it runs it) or not (another
        node holds it, or it has ended: then it does not run it)."""
        answers = await asyncio.gather(
            *(tracker.claim_start(job_log_id, claims.node) for job_log_id in claims.job_log_ids)
        )
        return StartClaimAnswers(claims=list(answers))

    @router.post("/job-logs/results", tags=["job-logs"])
    async def results(batch: ResultBatch, request: Request) -> ResultBatchAnswer:
        answers = await store(batch.results)
        refusals: RefusalLog = request.app.state.refusals  # the guard's (web/guard.py)
        source = request.client.host if request.client else "unknown"
        for answer in answers:
            if answer.status_code == 422:  # refused within a 200, which the guard cannot see
                refusals.refused(source, 422, f"a result in {request.url.path}", answer.detail)
        return ResultBatchAnswer(results=answers)

    async def write_node_list(what: str, call: object, *args: object) -> None:
        try:
            await run_in_threadpool(call, *args)  # type: ignore[arg-type]
        except RegistryError as err:
            raise HTTPException(503, f"{what}: the registry's node list: {err}") from None

    @router.post("/nodes", status_code=201, tags=["nodes"], responses=_errors(409))
    async def add_node(body: NodeAdd, who: Who) -> dict[str, object]:
        def add(listed: bool, check_only: bool = False) -> dict[str, object]:
            """`listed`: the node list has the node now, so the registry's watch may have
            made the row already: then that row is the answer. Tried again on a transient
            database error."""
            work = partial(add_in, listed=listed, check_only=check_only)
            what = f"manager: add node {body.ip}:{body.port}"
            return in_session(engine_sessions, work, what, commit=True)

        def add_in(s: Session, *, listed: bool, check_only: bool) -> dict[str, object]:
            now = utcnow()
            node = s.scalar(select(Node).where(Node.ip == body.ip, Node.port == body.port))
            if node is not None and not listed:
                raise HTTPException(409, f"node {body.ip}:{body.port} is already registered")
            if check_only:
                return {}
            # A node added by hand joins its group as a node that registers itself does.
            address = f"{body.ip}:{body.port}"
            created = ensure_node_groups(s.connection(), {body.node_group: address})
            if created:
                log.info(
                    "manager %s: node group %s created: node %s was added to it",
                    manager_id,
                    body.node_group,
                    address,
                )
            if node is None:
                trail.record(
                    s,
                    who,
                    AuditAction.NODE_ADDED,
                    address,
                    after={"ip": body.ip, "port": body.port, "node_group": body.node_group},
                )
                node = Node(
                    ip=body.ip,
                    port=body.port,
                    node_group=body.node_group,
                    status=NodeStatus.UNKNOWN.value,
                    source=NodeSource.MANUAL.value,
                    version="",
                    running_jobs=0,
                    created_at=now,
                    updated_at=now,
                )
                s.add(node)
            s.flush()
            return {
                "id": node.id,
                "ip": node.ip,
                "port": node.port,
                "node_group": node.node_group,
                "status": node.status,
                "source": node.source,
            }

        def group_exists() -> bool:
            with engine_sessions() as s:
                found = s.scalar(select(NodeGroup.id).where(NodeGroup.name == body.node_group))
                return found is not None

        # Asked before anything is written: with Consul, the registry's watch may create the
        # group from the node-list entry before this request's own write does.
        group_existed = await run_in_threadpool(group_exists)
        if node_list is None:
            return {**await run_in_threadpool(add, False), "group_created": not group_existed}
        await run_in_threadpool(add, False, True)
        await write_node_list(
            f"add node {body.ip}:{body.port}",
            node_list.list_node,
            body.ip,
            body.port,
            body.node_group,
        )
        try:
            added = await run_in_threadpool(add, True)
        except IntegrityError:  # the watch inserted the row between our read and write
            added = await run_in_threadpool(add, True)
        return {**added, "group_created": not group_existed}

    @router.delete("/nodes/{node_id:int}", status_code=204, tags=["nodes"], responses=_errors(404))
    async def remove_node(node_id: Id, who: Who) -> Response:
        def remove() -> int:
            what = f"manager: remove node {node_id}"
            return in_session(engine_sessions, remove_in, what, commit=True)

        def remove_in(s: Session) -> int:
            node = s.get(Node, node_id)
            if node is None:
                return 0
            was = {"ip": node.ip, "port": node.port, "node_group": node.node_group}
            trail.record(s, who, AuditAction.NODE_REMOVED, f"{node.ip}:{node.port}", before=was)
            return s.connection().execute(delete(Node).where(Node.id == node_id)).rowcount

        def find() -> tuple[str, int] | None:
            with engine_sessions() as s:
                node = s.get(Node, node_id)
                return None if node is None else (node.ip, node.port)

        if node_list is not None:
            # Out of the node list first: else the registry's watch would bring the row back.
            found = await run_in_threadpool(find)
            if found is None:
                raise HTTPException(404, f"node {node_id} does not exist")
            await write_node_list(
                f"remove node {found[0]}:{found[1]}", node_list.unlist_node, *found
            )
        if not await run_in_threadpool(remove):
            raise HTTPException(404, f"node {node_id} does not exist")
        return Response(status_code=204)

    return router


def _result_id(item: object) -> int | None:
    """The job-log id of a result that failed its check, if it has a usable one."""
    value = item.get("job_log_id") if isinstance(item, dict) else None
    try:
        return pydantic.TypeAdapter(Id).validate_python(value)
    except pydantic.ValidationError:
        return None
