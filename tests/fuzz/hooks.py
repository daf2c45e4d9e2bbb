"""Schemathesis hooks for tests/test_api_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

A node runs what it is given: a generated run must never be a generated command or URL. Every
run sent to a node's POST /jobs or /jobs/batch is made harmless just before it is sent (the
fields stay whatever was generated, of whatever type, except these three when they have the
type that would make them run): a shell job running `true`, reporting to the test's manager.
The daemons under test also run behind a proxy that does not exist, so nothing generated can
reach past this machine even if a case slipped through.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

RUN_ROUTES = ("/api/v1/jobs", "/api/v1/jobs/batch")


def harmless(run: Any) -> None:
    if not isinstance(run, dict):
        return
    if isinstance(run.get("payload"), dict):
        run["payload"] = {"command": "true"}
    if isinstance(run.get("task_type"), str):
        run["task_type"] = "shell"
    if isinstance(run.get("report_to"), str):
        run["report_to"] = os.environ["AYS_FUZZ_MANAGER_URL"]


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if case.operation.path not in RUN_ROUTES:
        return
    body = case.body
    if case.operation.path.endswith("/batch"):
        runs = body.get("runs") if isinstance(body, dict) else None
        for run in runs if isinstance(runs, list) else ():
            harmless(run)
    else:
        harmless(body)
