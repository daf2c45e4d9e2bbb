"""Data from parents to children: a child's run gets its parents' results of its slot.

A job may write a JSON result to the file named by AYS_RESULT_FILE (node/executor.py); it is
stored with its run (`ays_job_log.result`). A run of a task that has parents is dispatched
with `parent_results`: a JSON object, one key per parent task name, the value the result of
that parent's latest attempt of the same slot (null when it wrote none or did not run), and
the job sees it as AYS_PARENT_RESULTS. Read when the run is dispatched (first send, retry,
recovery), so a retry of a child gets them too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from ays_runtime.protocol import MAX_PARENT_RESULTS_BYTES
from ays_runtime.storage.models import JobLog, Task, TaskEdge
from ays_runtime.transport.base import JobDispatch


def with_parent_results(conn: Connection, dispatches: Sequence[JobDispatch]) -> list[JobDispatch]:
    """`dispatches`, those of tasks with parents carrying their parents' results."""
    if not dispatches:
        return []
    child_ids = {d.task_id for d in dispatches}
    parents: dict[int, list[str]] = {}
    for start in range(0, len(child_ids), 5000):
        chunk = sorted(child_ids)[start : start + 5000]
        for child_id, name in conn.execute(
            select(TaskEdge.child_id, TaskEdge.parent_name).where(TaskEdge.child_id.in_(chunk))
        ):
            parents.setdefault(child_id, []).append(name)
    if not parents:
        return list(dispatches)
    # One read per slot for every parent its children have (a fan-out of 1,000 children
    # reads its parent's result once).
    by_slot: dict[datetime, set[str]] = {}
    for d in dispatches:
        by_slot.setdefault(d.scheduled_at, set()).update(parents.get(d.task_id, ()))
    results = {at: _results(conn, names, at) for at, names in by_slot.items() if names}
    out = []
    for d in dispatches:
        names = parents.get(d.task_id)
        if names:
            d = replace(d, parent_results=_object(names, results[d.scheduled_at]))
        out.append(d)
    return out


def _results(conn: Connection, names: set[str], at: datetime) -> dict[str, Any]:
    """Each parent's result of slot `at` (its latest attempt's; a broadcast's shard 0)."""
    rows = conn.execute(
        select(Task.name, JobLog.attempt, JobLog.shard_index, JobLog.result)
        .join(JobLog, JobLog.task_id == Task.id)
        .where(Task.name.in_(sorted(names)), JobLog.scheduled_at == at)
        .order_by(Task.name, JobLog.attempt, JobLog.shard_index)
    ).all()
    found: dict[str, Any] = {}
    for r in rows:
        if r.result is not None and (r.shard_index == 0 or found.get(r.name) is None):
            found[r.name] = json.loads(r.result)
    return found


def _object(names: list[str], results: dict[str, Any]) -> str:
    text = json.dumps(
        {name: results.get(name) for name in sorted(names)},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    if len(text.encode()) > MAX_PARENT_RESULTS_BYTES:
        # Too much to hand on: the names, with null, say which parents there were.
        text = json.dumps(dict.fromkeys(sorted(names)))
    return text
