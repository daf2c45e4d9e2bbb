"""Node and group pages: nodes with group, status, version, last seen, running jobs and load
(as the node's last heartbeat reported it: 1-minute load average / CPUs, memory used);
groups with their nodes; adding and removing a node by hand; creating and deleting a group.

Adding and removing a node goes through the API's own routes (POST /api/v1/nodes, DELETE
/api/v1/nodes/{id}, manager/node_api.py), called in-process with the manager's token: they
write the registry's node list first (Consul or built in), which the console must not do
behind their back. Groups go through `ays_runtime.manager.tasks`, as the API's routes do.
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from ays_runtime.auth import auth_headers
from ays_runtime.console import csrf
from ays_runtime.console.render import (
    PAGE_SIZE,
    PageNo,
    console_actor,
    context_of,
    first,
    in_session,
    page,
    page_number,
    tasks_changed,
)
from ays_runtime.exceptions import ConflictError, ValidationError
from ays_runtime.manager import tasks
from ays_runtime.protocol import API
from ays_runtime.storage.models import Node, NodeGroup

router = APIRouter(include_in_schema=False, dependencies=[Depends(csrf.check)])


async def _api(request: Request, method: str, path: str, body: Any = None) -> httpx.Response:
    """Call the manager's own API in-process (its guard, validation and registry writes)."""
    transport = httpx.ASGITransport(app=request.app)
    headers = auth_headers(context_of(request).access_token)
    who = console_actor(request).who
    headers["X-Ays-Actor"] = "console" if who == "token" else who
    async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
        return await client.request(method, f"{API}{path}", json=body, headers=headers)


def _error_of(answer: httpx.Response) -> str:
    try:
        data = answer.json()
    except ValueError:
        return answer.text[:300]
    return str(data.get("error", data)) if isinstance(data, dict) else str(data)


async def _nodes_page(
    request: Request, status_code: int = 200, error: str = "", form: dict[str, str] | None = None
) -> HTMLResponse:
    number = page_number(request.query_params.get("page"))
    group = request.query_params.get("group", "")

    def load(s: Session) -> tuple[list[Node], int, list[NodeGroup], dict[str, list[Node]]]:
        items, total = tasks.list_nodes(
            s, node_group=group or None, limit=PAGE_SIZE, offset=(number - 1) * PAGE_SIZE
        )
        groups = tasks.list_node_groups(s)
        members: dict[str, list[Node]] = {g.name: [] for g in groups}
        every, _ = tasks.list_nodes(s, limit=tasks.MAX_PAGE)
        for node in every:
            members.setdefault(node.node_group, []).append(node)
        return items, total, groups, members

    items, total, groups, members = await in_session(request, load)
    return page(
        request,
        "nodes/list.html",
        status_code=status_code,
        items=items,
        total=total,
        groups=groups,
        members=members,
        filters={"group": group},
        page_no=number,
        pages=max(1, -(-total // PAGE_SIZE)),
        error=error,
        form=form or {"ip": "", "port": "", "node_group": "", "name": "", "description": ""},
        notice=request.query_params.get("notice", ""),
    )


@router.get("/nodes", response_class=HTMLResponse)
async def node_list(request: Request, page_no: PageNo = "1") -> HTMLResponse:
    return await _nodes_page(request)


@router.post("/nodes/add", response_model=None)
async def add_node(request: Request) -> Response:
    form = await csrf.form(request)
    values = {k: first(form, k).strip() for k in ("ip", "port", "node_group")}
    port: Any = int(values["port"]) if values["port"].isdigit() else values["port"]
    answer = await _api(
        request,
        "POST",
        "/nodes",
        {"ip": values["ip"], "port": port, "node_group": values["node_group"]},
    )
    if answer.status_code != 201:
        return await _nodes_page(
            request, status_code=answer.status_code, error=_error_of(answer), form=values
        )
    return RedirectResponse(f"/nodes?notice=added {values['ip']}:{port}", status_code=303)


@router.post("/nodes/{node_id:int}/remove")
async def remove_node(request: Request, node_id: int) -> Response:
    answer = await _api(request, "DELETE", f"/nodes/{node_id}")
    if answer.status_code != 204:
        return await _nodes_page(request, status_code=answer.status_code, error=_error_of(answer))
    return RedirectResponse(f"/nodes?notice=removed node {node_id}", status_code=303)


@router.post("/groups/add", response_model=None)
async def add_group(request: Request) -> Response:
    form = await csrf.form(request)
    values = {"name": first(form, "name").strip(), "description": first(form, "description")}
    try:
        await in_session(request, lambda s: tasks.create_node_group(s, values))
    except (ValidationError, ConflictError) as err:
        return await _nodes_page(request, status_code=422, error=str(err), form=values)
    await tasks_changed(request)
    return RedirectResponse(f"/nodes?notice=created group {values['name']}", status_code=303)


@router.post("/groups/{name}/delete")
async def delete_group(request: Request, name: str) -> Response:
    try:
        await in_session(request, lambda s: tasks.delete_node_group(s, name))
    except ConflictError as err:
        return await _nodes_page(request, status_code=409, error=str(err))
    await tasks_changed(request)
    return RedirectResponse(f"/nodes?notice=deleted group {name}", status_code=303)
