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
    cache: dict[tuple[int, datetime], str] = {}
    out = []
    for d in dispatches:
        names = parents.get(d.task_id)
        if names:
            key = (d.task_id, d.scheduled_at)
            if key not in cache:
                cache[key] = _results(conn, names, d.scheduled_at)
            d = replace(d, parent_results=cache[key])
        out.append(d)
    return out


def _results(conn: Connection, names: list[str], at: datetime) -> str:
    rows = conn.execute(
        select(Task.name, JobLog.attempt, JobLog.shard_index, JobLog.result)
        .join(JobLog, JobLog.task_id == Task.id)
        .where(Task.name.in_(names), JobLog.scheduled_at == at)
        .order_by(Task.name, JobLog.attempt, JobLog.shard_index)
    ).all()
    found: dict[str, Any] = dict.fromkeys(sorted(names))
    for r in rows:  # the latest attempt's (of shard 0 first: a broadcast's first shard)
        if r.result is not None and (r.shard_index == 0 or found[r.name] is None):
            found[r.name] = json.loads(r.result)
    text = json.dumps(found, ensure_ascii=False, separators=(",", ":"))
    if len(text.encode()) > MAX_PARENT_RESULTS_BYTES:
        # Too much to hand on: the names, with null, say which parents there were.
        text = json.dumps(dict.fromkeys(sorted(names)))
    return text
