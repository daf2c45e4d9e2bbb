"""A run's output through the manager's API (`/job-logs/{id}/output` and its event stream),
with a real manager and node on 127.0.0.1.

Jobs that must still be running while the test looks wait for a release file the test
creates, so "seen while it ran" never depends on timing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemons import Cluster, cluster, node, wait_for

FINAL = {"succeeded", "failed", "timed_out", "killed", "node_lost", "skipped", "discarded"}


Ays = Cluster


@pytest.fixture(scope="module")
def ays(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ays]:
    with cluster(tmp_path_factory.mktemp("output"), Cluster) as running:
        yield running


def start(ays: Ays, command: str, **fields: Any) -> int:
    """Create a task running `command` and trigger it; the run's job-log id."""
    body = {
        "name": f"t-{uuid.uuid4().hex[:8]}",
        "node_group": "g1",
        "schedule": "0 0 0 1 1 *",  # yearly: triggered by hand
        "task_type": "shell",
        "payload": {"command": command},
        **fields,
    }
    with ays.api() as api:
        created = api.post("/tasks", json=body)
        assert created.status_code == 201, created.text
        fired = api.post(f"/tasks/{created.json()['id']}/trigger", json={})
        assert fired.status_code == 202, fired.text
        return int(fired.json()["job_log_id"])


def gated(ays: Ays, before: str, after: str) -> tuple[str, Path]:
    """A command printing `before`, waiting (at most a minute) for a release file, then
    printing `after`; and that file."""
    release = ays.tmp / f"release-{uuid.uuid4().hex[:8]}"
    command = (
        f"echo {before}; for i in $(seq 600); do [ -e {release} ] && break; sleep 0.1; done; "
        f"echo {after}"
    )
    return command, release


def status(ays: Ays, job: int) -> str:
    with ays.api() as api:
        return str(api.get(f"/job-logs/{job}").json()["status"])


def output(ays: Ays, job: int, offset: int = 0) -> dict[str, Any]:
    with ays.api() as api:
        response = api.get(f"/job-logs/{job}/output", params={"offset": offset})
    assert response.status_code == 200, response.text
    return dict(response.json())


def events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a server-sent events response, as they arrive."""
    kind = ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            yield kind, json.loads(line[len("data: ") :])


def test_the_event_stream_shows_a_running_jobs_lines_as_it_writes_them_and_ends_with_it(
    ays: Ays,
) -> None:
    command, release = gated(ays, "first-line", "second-line")
    job = start(ays, command)
    seen: list[tuple[str, dict[str, Any]]] = []
    with (
        ays.api() as api,
        api.stream("GET", f"/job-logs/{job}/output/stream", timeout=120) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for kind, data in events(response):
            seen.append((kind, data))
            if kind == "output" and "first-line" in data["text"]:
                # The job cannot end before the release file exists: this is live output.
                assert status(ays, job) not in FINAL
                release.touch()
            if kind == "end":
                break
    text = "".join(data["text"] for kind, data in seen if kind == "output")
    assert text == "first-line\nsecond-line\n"
    assert seen[-1] == (
        "end",
        {"status": "succeeded", "exit_code": 0, "message": "exited with code 0"},
    )
    assert ("status", {"status": "succeeded", "node": f"127.0.0.1:{ays.node_port}"}) in seen


def test_reading_from_next_gives_only_what_the_job_wrote_since(ays: Ays) -> None:
    command, release = gated(ays, "one", "two")
    job = start(ays, command)
    first = wait_for(lambda: (o := output(ays, job))["text"] and o, 30, "the first line")
    assert (first["text"], first["source"], first["complete"]) == ("one\n", "node", False)
    release.touch()
    wait_for(lambda: status(ays, job) == "succeeded", 30, "the run to succeed")

    rest = output(ays, job, first["next"])

    assert (rest["text"], rest["offset"], rest["next"]) == ("two\n", 4, 8)
    assert rest["complete"] and rest["source"] == "node"


def test_the_output_stays_readable_after_a_kill_and_after_a_timeout(ays: Ays) -> None:
    command, _never = gated(ays, "before-the-kill", "never-printed")
    killed = start(ays, command)
    wait_for(lambda: output(ays, killed)["text"], 30, "the job's first line")
    with ays.api() as api:
        assert api.post(f"/job-logs/{killed}/kill", json={}, timeout=90).status_code == 202
    timed_out = start(ays, "echo before-the-timeout; sleep 120", timeout_s=1)
    wait_for(lambda: status(ays, timed_out) == "timed_out", 60, "the timeout")

    after_kill, after_timeout = output(ays, killed), output(ays, timed_out)

    assert after_kill["text"] == "before-the-kill\n" and after_kill["status"] == "killed"
    assert after_timeout["text"] == "before-the-timeout\n"
    assert after_kill["complete"] and after_timeout["complete"]


def test_a_run_unknown_to_the_manager_is_a_404_on_both_routes(ays: Ays) -> None:
    with ays.api() as api:
        assert api.get("/job-logs/987654/output").status_code == 404
        assert api.get("/job-logs/987654/output/stream").status_code == 404
        assert api.get("/job-logs/1/output", params={"offset": -1}).status_code == 422


def test_without_its_node_the_stored_excerpt_is_the_output(ays: Ays) -> None:
    job = start(ays, "echo kept-in-the-job-log")
    wait_for(lambda: status(ays, job) == "succeeded", 30, "the run to succeed")
    assert ays.node is not None
    ays.node.stop()
    try:
        stored = output(ays, job)
        with (
            ays.api() as api,
            api.stream("GET", f"/job-logs/{job}/output/stream", timeout=60) as response,
        ):
            streamed = list(events(response))
    finally:
        ays.node = node(ays.config, ays.tmp / "node-2.log", "g1", ays.node_port).start()

    assert (stored["text"], stored["source"]) == ("kept-in-the-job-log\n", "job_log")
    assert stored["complete"]
    assert ("output", {"text": "kept-in-the-job-log\n", "next": 20}) in streamed
    assert streamed[-1][0] == "end"
