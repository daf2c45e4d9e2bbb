"""A run's output as the API, the console and the CLI show it: live from the node that runs
it, or the excerpt stored in the job log.

`RunOutput.read(job_log_id, offset)` answers one `OutputChunk`; `RunOutput.follow()` yields
`OutputEvent`s (output text, status changes, the end) until the run has ended and its output
has been read to the end. Both are what `GET /api/v1/job-logs/{id}/output` and
`.../output/stream` serve.

Where the text comes from:

- `node`: the node named in the job-log row is asked (`GET /api/v1/jobs/{id}/output?offset=N`
  on its API, every node serves it whatever the transport). Offsets are positions in the
  job's output stream, in bytes, counted by the node: a follower asks for `next` and gets
  only what came since. A node keeps the output of a finished run for its last runs, so the
  whole output stays readable after the run ended, was killed or timed out.
- `job_log`: the node cannot be asked (gone, restarted, no longer keeps it): the stored
  excerpt, the end of the output (at most `job_log.excerpt_bytes`); offsets are then
  positions in the excerpt's UTF-8 bytes.
- `none`: no node holds the run yet (pending, or dispatched through a queue with no node
  named) and nothing is stored: empty text.

Text is UTF-8 decoded with replacement characters; while a job runs, a character cut in two
by the end of a chunk is held back until its remaining bytes arrive.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.auth import auth_headers
from ays_runtime.exceptions import NotFoundError
from ays_runtime.protocol import API, OUTPUT_NEXT_HEADER, RUN_STATE_HEADER
from ays_runtime.registry.base import NodeRef
from ays_runtime.storage.models import JobLog, RunStatus
from ays_runtime.web.keepalive import client_limits

log = logging.getLogger("ays.manager.output")

Source = Literal["node", "job_log", "none"]

# A node answers an output read from memory; one that takes longer is treated as away.
NODE_TIMEOUT = httpx.Timeout(5.0, connect=2.0)
# How often a follower looks again while the run goes on: quickly while output flows, more
# slowly while nothing changes (a quiet job must not cost a query every half second).
FOLLOW_FAST = 0.25
FOLLOW_SLOW = 2.0
QUIET_AFTER = 10.0  # seconds without new output before following slows down
# Reads after the run ended while its node still shows it going (it lost track of it).
MAX_READS_AFTER_END = 8
# An event stream says something at least this often, so proxies keep it open and a reader
# that went away is noticed.
KEEPALIVE = 15.0

_FINAL = frozenset(s.value for s in RunStatus if s.is_final)


@dataclass(frozen=True)
class OutputChunk:
    """One read of a run's output, from `offset` to `next`."""

    job_log_id: int
    status: str
    node: str
    offset: int
    next: int
    text: str
    complete: bool  # the run has ended and nothing more will come
    source: Source
    exit_code: int | None = None
    message: str = ""


@dataclass(frozen=True)
class OutputEvent:
    """What a follower is told: `output` {text, next}, `status` {status, node} or `end`
    {status, exit_code, message}; `keepalive` carries nothing."""

    kind: Literal["output", "status", "end", "keepalive"]
    data: dict[str, Any] = field(default_factory=dict)

    def sse(self) -> str:
        """The event in the server-sent events wire format."""
        if self.kind == "keepalive":
            return ": keep-alive\n\n"
        return f"event: {self.kind}\ndata: {json.dumps(self.data)}\n\n"


@dataclass(frozen=True)
class _Row:
    status: str
    node: str
    output: str
    exit_code: int | None
    message: str


class RunOutput:
    """Reads runs' output for the API; one per manager (it keeps one HTTP client)."""

    def __init__(self, sessions: sessionmaker[Session], access_token: str) -> None:
        self._sessions = sessions
        self._headers = auth_headers(access_token)
        self._client: httpx.AsyncClient | None = None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def read(self, job_log_id: int, offset: int = 0) -> OutputChunk:
        """The run's output from `offset` on. Raises NotFoundError for an unknown run."""
        row = await asyncio.to_thread(self._load, job_log_id)
        final = row.status in _FINAL
        if row.node:
            live = await self._ask_node(job_log_id, row.node, offset)
            if live is not None:
                data, following, state = live
                ended = state == "finished"
                if not ended:
                    data, following = _whole_characters(data, following)
                return OutputChunk(
                    job_log_id,
                    row.status,
                    row.node,
                    offset,
                    following,
                    data.decode("utf-8", "replace"),
                    complete=final and ended,
                    source="node",
                    exit_code=row.exit_code,
                    message=row.message,
                )
        stored = row.output.encode()
        start = min(max(offset, 0), len(stored))
        return OutputChunk(
            job_log_id,
            row.status,
            row.node,
            offset,
            len(stored),
            stored[start:].decode("utf-8", "replace"),
            complete=final,
            source="job_log" if final or stored else "none",
            exit_code=row.exit_code,
            message=row.message,
        )

    async def follow(self, job_log_id: int, offset: int = 0) -> AsyncIterator[OutputEvent]:
        """Events until the run has ended and its output is read to the end. Raises
        NotFoundError (before the first event) for an unknown run."""
        loop = asyncio.get_running_loop()
        status = node = ""
        source: Source | None = None  # where the text shown so far came from
        quiet_since = said_at = loop.time()
        reads_after_end = 0
        while True:
            chunk = await self.read(job_log_id, offset)
            if (chunk.status, chunk.node) != (status, node):
                status, node = chunk.status, chunk.node
                said_at = loop.time()
                yield OutputEvent("status", {"status": status, "node": node})
            # Offsets of different sources do not line up: once text came from one, the
            # other is not mixed in (a node gone mid-run leaves the excerpt unshown).
            if source in (None, chunk.source):
                offset = chunk.next
                if chunk.text:
                    source = chunk.source
                    quiet_since = said_at = loop.time()
                    yield OutputEvent("output", {"text": chunk.text, "next": chunk.next})
            if chunk.status in _FINAL:
                reads_after_end += 1
            # Ended: once the node says so too, or at once when the node is not the source;
            # a node that never says so (it lost the run) gets a few more reads, not more.
            if (
                chunk.complete
                or chunk.source != "node"
                and chunk.status in _FINAL
                or (reads_after_end > MAX_READS_AFTER_END)
            ):
                yield OutputEvent(
                    "end",
                    {
                        "status": chunk.status,
                        "exit_code": chunk.exit_code,
                        "message": chunk.message,
                    },
                )
                return
            quiet = loop.time() - quiet_since
            await asyncio.sleep(FOLLOW_FAST if quiet < QUIET_AFTER else FOLLOW_SLOW)
            if loop.time() - said_at >= KEEPALIVE:
                said_at = loop.time()
                yield OutputEvent("keepalive")

    # --- internals ------------------------------------------------------------------------

    def _load(self, job_log_id: int) -> _Row:
        with self._sessions() as session:
            row = session.execute(
                select(
                    JobLog.status, JobLog.node, JobLog.output, JobLog.exit_code, JobLog.message
                ).where(JobLog.id == job_log_id)
            ).first()
        if row is None:
            raise NotFoundError(f"job log {job_log_id} does not exist")
        return _Row(row.status, row.node or "", row.output or "", row.exit_code, row.message)

    async def _ask_node(
        self, job_log_id: int, address: str, offset: int
    ) -> tuple[bytes, int, str] | None:
        """(bytes, next, state) from the node, or None when it cannot tell."""
        ip, _, port = address.rpartition(":")
        if not ip or not port.isdigit():
            return None
        url = f"{NodeRef(ip.strip('[]'), int(port), '').url}{API}/jobs/{job_log_id}/output"
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers=self._headers, timeout=NODE_TIMEOUT, limits=client_limits()
            )
        try:
            response = await self._client.get(url, params={"offset": max(offset, 0)})
        except httpx.HTTPError as err:
            log.debug("run %d: node %s: no answer for its output: %r", job_log_id, address, err)
            return None
        following = response.headers.get(OUTPUT_NEXT_HEADER, "")
        if response.status_code != 200 or not following.isdigit():
            return None  # unknown there (restarted, or no longer kept), or an older node
        return response.content, int(following), response.headers.get(RUN_STATE_HEADER, "")


def _whole_characters(data: bytes, following: int) -> tuple[bytes, int]:
    """`data` without a UTF-8 character cut off at its end (it comes whole next time)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: nothing cut
            return data, following
        if byte >= 0xC0:  # the lead byte of the last character
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            if needed > back:
                return data[:-back], following - back
            return data, following
    return data, following
