"""Manager route for Consul agent watches (registry backend consul only).

    POST /api/v1/registry/consul/watch   body: what a Consul `key` watch's HTTP handler
                                         sends, the KV entry of <kv_prefix>/nodelist (JSON
                                         null when the key is gone) -> 200 {"status": ...}

The caller must present the access token as `Authorization: Bearer <token>` (the watch
config `installConfig manager` renders puts it in the handler's `header`, never in the URL);
the guard in front of the app checks it before the body is read.
The node list is applied at once if the entry is not older than the manager's, then the node
list and the service health are read again from Consul: a push only makes the manager
faster, its own blocking queries stay the source of truth.
"""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, HTTPException, Request

from ays_runtime.exceptions import RegistryError
from ays_runtime.manager.schemas import ErrorOut
from ays_runtime.protocol import API
from ays_runtime.registry.consul import ConsulRegistry

log = logging.getLogger("ays.api")

WATCH_PATH = f"{API}/registry/consul/watch"


def consul_watch_router(registry: ConsulRegistry, manager_id: str) -> APIRouter:
    router = APIRouter()

    @router.post(WATCH_PATH, tags=["registry"], responses={422: {"model": ErrorOut}})
    async def watch_fired(request: Request) -> dict[str, str]:
        body = await request.body()
        try:
            payload = json.loads(body) if body.strip() else None
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            raise HTTPException(
                422, "body: not JSON; expected the KV entry of the node-list key"
            ) from None
        try:
            registry.watch_fired(payload)
        except RegistryError as err:
            raise HTTPException(422, str(err)) from None
        log.debug(
            "manager %s: consul watch fired for %s: resynchronising", manager_id, registry.key
        )
        return {"status": "resynchronising"}

    return router
