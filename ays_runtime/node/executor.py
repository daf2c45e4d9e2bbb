"""The node's job executor: runs shell commands and HTTP calls, bounded and killable.

One `Executor` per node process, used from one event loop. It knows nothing of HTTP APIs or
message queues: the node's transport hands it a `JobSpec`, awaits `run()`, and reports the
`JobResult` that comes back.

The contract
------------
- `run(spec)` always returns a `JobResult`; a job that cannot start (bad payload, missing
  workdir, unknown task type) is a *failed* result with a message naming the field, never an
  exception. At most `max_concurrent` jobs run at once; more wait for a slot, first come first
  served. The timeout counts from the start of the job, not from the call.
- `run()` is idempotent per job id (the job-log id): a second call while the job is waiting or
  running, or after it finished while its result is kept, returns the same result and never
  starts the job again. An at-least-once transport may deliver a job twice.
- Cancelling the caller of `run()` does not stop the job (it belongs to the executor, so that
  nothing is left running unowned); `kill()` stops it. A job killed before it got a slot
  never starts.
- Status: exit code 0 is *succeeded*, any other exit *failed*; a timeout is *timed_out*,
  `kill()` is *killed*. `exit_code` follows the shell convention: a process ended by signal N
  has 128 + N (SIGKILL: 137). It is None when no process ran (HTTP jobs, jobs that could not
  start).
- Ending a shell job (timeout, kill, shutdown) ends all of its processes: SIGTERM (and SIGCONT,
  for stopped ones) to its process group and to every descendant found with psutil just
  before signalling (which catches those that left the group with setsid), then after
  `kill_grace` seconds SIGKILL to whatever is left. A process that detached itself *and* was
  already orphaned when the job ended cannot be found: that is the one way out, and the way a
  job may deliberately start a long-lived service.
- When the command exits on its own, processes it left running in its process group (a
  forgotten `cmd &`) are ended the same way: a job never leaves processes behind.
- Output: stdout and stderr, merged, are read as they come into a buffer of at most
  `output_cap_bytes` (head and tail kept, see `output.OutputBuffer`); `output(job_id)` gives
  it while the job runs and after, for the last `keep_finished` runs (and at most
  `keep_output_bytes` of them in all). `JobResult.output_excerpt` is the *end* of the output,
  at most `excerpt_bytes` of UTF-8 (the end is where failures show); `output_truncated` says
  the excerpt is not the whole output. The node stops reading `pipe_grace` seconds after the
  job's processes ended, even if something still holds the pipe open.
- Shell jobs run `/bin/sh -c COMMAND` in their own session, stdin from /dev/null, in
  `payload.workdir` (absolute; default: the node user's home, or / if it has none). The
  environment is built, not inherited: PATH, HOME, LANG, LC_ALL, TZ, USER and LOGNAME from the
  node (so no secret of the node's environment reaches a job), then `payload.env`, then the
  AYS_* variables, which a task cannot override: AYS_JOB_ID, AYS_TASK_ID, AYS_PARAMS,
  AYS_SHARD_INDEX, AYS_SHARD_TOTAL, AYS_ATTEMPT, AYS_SCHEDULED_AT, AYS_PARENT_RESULTS (the
  results of the task's parents' runs of this slot, a JSON object by parent name; `{}` for
  none) and AYS_RESULT_FILE: a file (mode 0600) the job may write a JSON result to, at most
  MAX_JOB_RESULT_BYTES, read when the job ends and reported with its result (its children get
  it in their AYS_PARENT_RESULTS); the file is deleted then.
- HTTP jobs send `payload.method` (default GET) to `payload.url` with `payload.headers`;
  `payload.body` is sent as is when a string, as JSON otherwise. Redirects are not followed.
  `payload.expected_status` (an int or a list of ints; default any 2xx) decides success. The
  output is the status line and the response body. Without a task timeout, each network
  step may take 30 s. HTTP jobs share one client per executor (`aclose()` ends it): its
  connections are kept for a few seconds between jobs, since opening one per job was about
  half of an HTTP job's CPU on the node's event loop; it keeps no cookies, so one job never
  sees what another's server set.
- A job does not outlive its node. `on_spawn(spec, pid)`, when given, is awaited twice for a
  shell job: with pid None just before its shell is spawned (the node journals the run
  ahead, so a node killed at any moment after the spawn leaves an entry behind), and with
  the shell's pid as soon as it is spawned (the node journals the process group, see
  `journal`); on
  Linux the shell also gets a parent-death signal (SIGTERM when the thread that spawned it
  ends: the event loop's thread, which in the node is the main thread, so this is when the
  node's process dies), asked for by `setpriv --pdeathsig` in front of the shell where the
  host's setpriv has it (the spawn is then a vfork, not a fork of the node), else by a
  preexec_fn. Its children do not inherit that signal: the node's journal ends
  them when it starts again, and under systemd the unit's control group does at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import http.cookiejar
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import psutil

from ays_runtime.config import EnvConfig
from ays_runtime.exceptions import ValidationError
from ays_runtime.node import limits
from ays_runtime.node.output import OutputBuffer, PipeReader
from ays_runtime.protocol import MAX_JOB_RESULT_BYTES
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import RunStatus, TaskType

log = logging.getLogger("ays.node.executor")

# What a job inherits from the node's own environment; nothing else (tokens, passwords).
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_LANG = "C.UTF-8"
SHELL = "/bin/sh"
HTTP_STEP_TIMEOUT = 30.0  # seconds per network step of an HTTP job that has no timeout
# Seconds an HTTP job's idle connection is kept for the next job to the same server: short,
# because servers of every kind close idle connections, some after 2-5 s, and a job sent on
# a connection closing at that instant would fail.
HTTP_JOB_KEEP_ALIVE_S = 1.5
KEEP_FINISHED = 200
KEEP_OUTPUT_BYTES = 64 * 1024 * 1024
PIPE_GRACE = 1.0
POLL_INTERVAL = 0.05
# SIGKILL cannot be refused, but a process in uninterruptible sleep (a dead NFS mount) dies
# only when the kernel lets it: wait this long, then report and move on.
SIGKILL_WAIT = 5.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class JobSpec:
    """One job to run: a job-log row and its task as it was when it fired."""

    job_id: int  # the job-log id: unique per run, retries included
    task_id: int
    task_type: str  # TaskType value: "shell" or "http"
    payload: dict[str, Any]
    timeout_s: float = 0  # 0: no timeout
    params: str = ""
    shard_index: int = 0
    shard_total: int = 1
    attempt: int = 0
    scheduled_at: str = ""  # ISO 8601, naive UTC
    parent_results: str = ""  # JSON object by parent task name (AYS_PARENT_RESULTS)


@dataclass
class JobResult:
    """How a job ended. Datetimes are naive UTC; `started_at` is None when it never started."""

    job_id: int
    status: str  # a final RunStatus value
    exit_code: int | None
    started_at: datetime | None
    ended_at: datetime
    output_excerpt: str
    output_truncated: bool
    message: str
    output_bytes: int = 0  # everything the job wrote, kept or not
    result: str = ""  # the JSON the job wrote to AYS_RESULT_FILE, "" for none

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, datetimes as ISO 8601 strings."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "exit_code": self.exit_code,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "ended_at": self.ended_at.isoformat(),
            "output_excerpt": self.output_excerpt,
            "output_truncated": self.output_truncated,
            "output_bytes": self.output_bytes,
            "message": self.message,
        }


class _Invalid(Exception):
    """A payload field the job cannot start with; the message names it."""


class _Run:
    """The executor's record of one job, from `run()` to its result."""

    def __init__(self, spec: JobSpec, output_cap: int) -> None:
        self.spec = spec
        self.output = OutputBuffer(output_cap)
        self.kill_requested = asyncio.Event()
        self.kill_reason = ""
        self.started_at: datetime | None = None
        self.task: asyncio.Task[JobResult] | None = None


@dataclass
class _Finished:
    result: JobResult
    output: OutputBuffer | None  # None once dropped to keep the node's memory bounded


class Executor:
    """Runs jobs on this node. See the module docstring for the contract."""

    def __init__(
        self,
        max_concurrent: int = 8,
        output_cap_bytes: int = 1_048_576,
        excerpt_bytes: int = 16_384,
        kill_grace: float = 5.0,
        *,
        keep_finished: int = KEEP_FINISHED,
        keep_output_bytes: int = KEEP_OUTPUT_BYTES,
        pipe_grace: float = PIPE_GRACE,
        http_keep_alive: float = HTTP_JOB_KEEP_ALIVE_S,
        speaker: str = "executor",
        on_spawn: Callable[[JobSpec, int | None], Awaitable[None]] | None = None,
    ) -> None:
        _check("max_concurrent", max_concurrent, max_concurrent >= 1, "an integer >= 1")
        _check("output_cap_bytes", output_cap_bytes, output_cap_bytes >= 256, "at least 256")
        _check("excerpt_bytes", excerpt_bytes, excerpt_bytes >= 256, "at least 256")
        _check("kill_grace", kill_grace, kill_grace >= 0, "seconds, >= 0")
        _check("keep_finished", keep_finished, keep_finished >= 0, "an integer >= 0")
        _check("keep_output_bytes", keep_output_bytes, keep_output_bytes >= 0, ">= 0")
        _check("pipe_grace", pipe_grace, pipe_grace >= 0, "seconds, >= 0")
        self.max_concurrent = max_concurrent
        self.output_cap_bytes = output_cap_bytes
        self.excerpt_bytes = min(excerpt_bytes, output_cap_bytes)
        self.kill_grace = kill_grace
        self.keep_finished = keep_finished
        self.keep_output_bytes = keep_output_bytes
        self.pipe_grace = pipe_grace
        self.http_keep_alive = http_keep_alive
        self.speaker = speaker  # who speaks in log lines, e.g. "node 10.0.0.5:18181"
        self.on_spawn = on_spawn
        self._slots = asyncio.Semaphore(max_concurrent)
        self._active: dict[int, _Run] = {}  # waiting or running
        self._running = 0
        self._finished: OrderedDict[int, _Finished] = OrderedDict()
        self._kept_bytes = 0
        self._http: httpx.AsyncClient | None = None
        _death_signal_wrapper()  # probed once per process, here rather than in the event loop

    @classmethod
    def from_config(
        cls,
        config: EnvConfig,
        speaker: str = "executor",
        on_spawn: Callable[[JobSpec, int | None], Awaitable[None]] | None = None,
    ) -> Executor:
        """An executor set up by the env file's `node` and `job_log` sections."""
        return cls(
            max_concurrent=config.node.max_concurrent_jobs,
            output_cap_bytes=config.node.output_cap_bytes,
            excerpt_bytes=config.job_log.excerpt_bytes,
            kill_grace=config.node.kill_grace,
            speaker=speaker,
            on_spawn=on_spawn,
        )

    def _unjournaled(self, spec: JobSpec, err: OSError) -> None:
        log.error(
            "%s: job %d: cannot journal it (it runs on, but a crash of the node would leave "
            "it running): %s",
            self.speaker,
            spec.job_id,
            err.strerror or err,
        )

    # --- the public surface -------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Jobs holding a slot now."""
        return self._running

    @property
    def waiting(self) -> int:
        """Jobs accepted but waiting for a slot."""
        return len(self._active) - self._running

    def is_running(self, job_id: int) -> bool:
        """True while the job holds a slot (not while it waits for one)."""
        run = self._active.get(job_id)
        return run is not None and run.started_at is not None

    async def run(self, spec: JobSpec) -> JobResult:
        """Run the job (once per job id, see the contract) and return how it ended."""
        run = self._active.get(spec.job_id)
        if run is None:
            kept = self._finished.get(spec.job_id)
            if kept is not None:
                return kept.result
            run = _Run(spec, self.output_cap_bytes)
            self._active[spec.job_id] = run
            run.task = asyncio.create_task(self._execute(run), name=f"ays-job-{spec.job_id}")
        assert run.task is not None
        return await asyncio.shield(run.task)

    async def kill(self, job_id: int, reason: str = "killed by operator") -> bool:
        """End a waiting or running job and wait until it has ended (at most about
        `kill_grace` seconds). True when it ended as killed; False when no such job was
        active, or it finished on its own first."""
        run = self._active.get(job_id)
        if run is None or run.task is None:
            return False
        if not run.kill_requested.is_set():
            run.kill_reason = reason
            run.kill_requested.set()
        result = await asyncio.shield(run.task)
        return result.status == RunStatus.KILLED.value

    async def kill_all(self, reason: str = "killed: node shutting down") -> int:
        """Kill every waiting and running job at once; return how many ended as killed."""
        ids = list(self._active)
        killed = await asyncio.gather(*(self.kill(job_id, reason) for job_id in ids))
        return sum(killed)

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every waiting and running job (including jobs
        accepted meanwhile) to end. True when none is left. Kills nothing: for a shutdown,
        stop accepting jobs, drain, then `kill_all()`."""
        deadline = time.monotonic() + timeout
        while self._active:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            tasks = {run.task for run in self._active.values() if run.task is not None}
            await asyncio.wait(tasks, timeout=left)
        return True

    async def aclose(self) -> None:
        """Close the HTTP jobs' shared client (after the last job ended)."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def output(self, job_id: int) -> bytes | None:
        """The captured output of an active or kept job (at most `output_cap_bytes` of it,
        plus one marker line where bytes were dropped); None when the job is unknown or its
        output is no longer kept."""
        buffer = self._output_buffer(job_id)
        return buffer.getvalue() if buffer is not None else None

    def output_from(self, job_id: int, position: int) -> tuple[bytes, int] | None:
        """The output from stream position `position` on, and the position to ask for next
        (see `OutputBuffer.read_from`); None as for `output`."""
        buffer = self._output_buffer(job_id)
        return buffer.read_from(position) if buffer is not None else None

    def _output_buffer(self, job_id: int) -> OutputBuffer | None:
        run = self._active.get(job_id)
        if run is not None:
            return run.output
        kept = self._finished.get(job_id)
        return kept.output if kept is not None else None

    def result(self, job_id: int) -> JobResult | None:
        """The result of a finished job while it is kept."""
        kept = self._finished.get(job_id)
        return kept.result if kept is not None else None

    # --- one job ----------------------------------------------------------------------------

    async def _execute(self, run: _Run) -> JobResult:
        spec = run.spec
        result: JobResult | None = None
        try:
            if not await self._acquire_slot(run):
                result = self._result(
                    run, RunStatus.KILLED, None, f"{run.kill_reason} (before it started)"
                )
                return result
            self._running += 1
            run.started_at = utcnow()
            log.info(
                "%s: job %d (task %d, %s) started",
                self.speaker,
                spec.job_id,
                spec.task_id,
                spec.task_type,
            )
            try:
                result = await self._dispatch(run)
            except Exception as err:  # a bug here must still end the job with a result
                log.exception("%s: job %d: executor error", self.speaker, spec.job_id)
                result = self._result(
                    run, RunStatus.FAILED, None, f"node error: {type(err).__name__}: {err}"
                )
            finally:
                self._running -= 1
                self._slots.release()
            log.info(
                "%s: job %d (task %d) %s: %s",
                self.speaker,
                spec.job_id,
                spec.task_id,
                result.status,
                result.message,
            )
            return result
        finally:
            del self._active[spec.job_id]
            if result is not None:
                self._keep(run, result)

    async def _acquire_slot(self, run: _Run) -> bool:
        """Wait for a slot; False (holding none) when the job is killed first."""
        if run.kill_requested.is_set():
            return False
        acquire = asyncio.ensure_future(self._slots.acquire())
        killed = asyncio.ensure_future(run.kill_requested.wait())
        try:
            await asyncio.wait({acquire, killed}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await self._give_up_slot(acquire)
            raise
        finally:
            killed.cancel()
        if run.kill_requested.is_set():
            await self._give_up_slot(acquire)
            return False
        return True

    async def _give_up_slot(self, acquire: asyncio.Future[Any]) -> None:
        if not acquire.done():
            acquire.cancel()
            await asyncio.wait({acquire})
        if not acquire.cancelled():  # it got the slot before the cancel landed
            self._slots.release()

    async def _dispatch(self, run: _Run) -> JobResult:
        task_type = run.spec.task_type
        try:
            if task_type == TaskType.SHELL.value:
                return await self._run_shell(run)
            if task_type == TaskType.HTTP.value:
                return await self._run_http(run)
            raise _Invalid(f"task_type {task_type!r} is not known: use 'shell' or 'http'")
        except _Invalid as err:
            return self._result(run, RunStatus.FAILED, None, str(err))

    def _result(
        self, run: _Run, status: RunStatus, exit_code: int | None, message: str
    ) -> JobResult:
        excerpt, truncated = run.output.excerpt(self.excerpt_bytes)
        return JobResult(
            job_id=run.spec.job_id,
            status=status.value,
            exit_code=exit_code,
            started_at=run.started_at,
            ended_at=utcnow(),
            output_excerpt=excerpt,
            output_truncated=truncated,
            message=message,
            output_bytes=run.output.total,
        )

    def _keep(self, run: _Run, result: JobResult) -> None:
        if self.keep_finished == 0:
            return
        output = run.output
        output.compact()
        self._finished[run.spec.job_id] = _Finished(result, output)
        self._kept_bytes += output.kept
        while len(self._finished) > self.keep_finished:
            _, oldest = self._finished.popitem(last=False)
            self._kept_bytes -= oldest.output.kept if oldest.output is not None else 0
        for kept in self._finished.values():  # oldest first
            if self._kept_bytes <= self.keep_output_bytes:
                break
            if kept.output is not None:
                self._kept_bytes -= kept.output.kept
                kept.output = None

    # --- shell jobs -------------------------------------------------------------------------

    async def _run_shell(self, run: _Run) -> JobResult:
        spec = run.spec
        command, env, workdir = _shell_job(spec)
        if not os.path.exists(workdir):
            raise _Invalid(f"workdir {workdir} does not exist")
        if not os.path.isdir(workdir):
            raise _Invalid(f"workdir {workdir} is not a directory")
        if self.on_spawn is not None:
            try:
                await self.on_spawn(spec, None)
            except OSError as err:  # the job runs on, as it would have without a journal
                self._unjournaled(spec, err)
        result_fd, result_file = tempfile.mkstemp(prefix=f"ays-result-{spec.job_id}-")
        os.close(result_fd)  # mode 0600: the job (the node's user) writes it, we read it
        env["AYS_RESULT_FILE"] = result_file
        try:
            result = await self._run_shell_in(run, command, env, workdir)
        finally:
            job_result, problem = _read_result(result_file)
            with contextlib.suppress(OSError):
                os.unlink(result_file)
        result.result = job_result
        if problem:
            result.message += f"; {problem}"
        return result

    async def _run_shell_in(
        self, run: _Run, command: str, env: dict[str, str], workdir: str
    ) -> JobResult:
        spec = run.spec
        read_fd, write_fd = os.pipe()  # our own pipe: closing it is ours to decide
        try:
            wrapper = _death_signal_wrapper()
            proc = await asyncio.create_subprocess_exec(
                *wrapper,
                SHELL,
                "-c",
                command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                cwd=workdir,
                env=env,
                start_new_session=True,
                preexec_fn=None if wrapper else _parent_death_signal(),
            )
        except OSError as err:
            os.close(read_fd)
            raise _Invalid(f"cannot start {SHELL} in workdir {workdir}: {err.strerror}") from None
        finally:
            os.close(write_fd)
        reader = PipeReader(read_fd, run.output)
        pgid = proc.pid  # start_new_session: the shell leads its own session and group
        exited = asyncio.ensure_future(proc.wait())
        killed = asyncio.ensure_future(run.kill_requested.wait())
        try:
            if self.on_spawn is not None:
                try:
                    await self.on_spawn(spec, proc.pid)
                except OSError as err:
                    self._unjournaled(spec, err)
            timeout = spec.timeout_s if spec.timeout_s > 0 else None
            done, _ = await asyncio.wait(
                {exited, killed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if exited in done:
                status, message = _exit_status(proc.returncode)
                # Output written just before the exit, then what the command left behind.
                await reader.wait_eof(self.pipe_grace)
                if _group_members(pgid):
                    how = await self._end_processes(pgid, [], exited)
                    message += f"; processes it left running were ended ({how})"
            else:
                if killed in done:
                    status, message = RunStatus.KILLED, run.kill_reason
                else:
                    status, message = RunStatus.TIMED_OUT, f"timed out after {spec.timeout_s:g}s"
                how = await self._end_processes(pgid, _descendants(proc.pid), exited)
                message += f"; its processes were ended ({how})"
            if not await reader.wait_eof(self.pipe_grace):
                message += "; output cut short: a detached process still holds it open"
            return self._result(run, status, _exit_code(proc.returncode), message)
        finally:
            killed.cancel()
            if proc.returncode is None:  # cancelled or failed here: no grace, no leftovers
                targets = _descendants(proc.pid)
                _signal(pgid, targets, signal.SIGKILL)
                await asyncio.wait({exited}, timeout=SIGKILL_WAIT)
            reader.close()

    async def _end_processes(
        self, pgid: int, targets: list[psutil.Process], exited: asyncio.Future[int]
    ) -> str:
        """SIGTERM the group and `targets`, SIGKILL what is left after the grace; wait for
        the job's shell to be reaped. Returns how it went, for the message."""
        _signal(pgid, targets, signal.SIGTERM)
        _signal(pgid, targets, signal.SIGCONT)  # a stopped process acts on SIGTERM only now
        how = "SIGTERM"
        if not await _all_gone(pgid, targets, self.kill_grace):
            _signal(pgid, targets, signal.SIGKILL)
            how = f"SIGKILL after {self.kill_grace:g}s grace"
            if not await _all_gone(pgid, targets, SIGKILL_WAIT):
                log.warning(
                    "%s: process group %d survived SIGKILL for %gs",
                    self.speaker,
                    pgid,
                    SIGKILL_WAIT,
                )
        await asyncio.wait({exited}, timeout=SIGKILL_WAIT)
        return how

    # --- HTTP jobs --------------------------------------------------------------------------

    async def _run_http(self, run: _Run) -> JobResult:
        spec = run.spec
        request = _http_job(spec)
        call = asyncio.ensure_future(self._http_call(run, request))
        killed = asyncio.ensure_future(run.kill_requested.wait())
        timeout = spec.timeout_s if spec.timeout_s > 0 else None
        try:
            done, _ = await asyncio.wait(
                {call, killed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            killed.cancel()
            if not call.done():
                call.cancel()
                await asyncio.wait({call})
        if call in done:
            status, message = call.result()
        elif killed in done:
            status, message = RunStatus.KILLED, run.kill_reason
        else:
            status, message = RunStatus.TIMED_OUT, f"timed out after {spec.timeout_s:g}s"
        return self._result(run, status, None, message)

    async def _http_call(self, run: _Run, request: _HttpRequest) -> tuple[RunStatus, str]:
        step = run.spec.timeout_s if run.spec.timeout_s > 0 else HTTP_STEP_TIMEOUT
        where = f"{request.method} {request.url}"
        try:
            async with self._http_client().stream(
                request.method, request.url, headers=request.headers, timeout=step, **request.body
            ) as response:
                line = f"{response.http_version} {response.status_code} "
                run.output.write(f"{line}{response.reason_phrase}\n".encode())
                async for chunk in response.aiter_bytes():
                    run.output.write(chunk)
        except httpx.TimeoutException:
            return RunStatus.TIMED_OUT, f"{where}: no response within {step:g}s"
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as err:
            return RunStatus.FAILED, f"payload.url {request.url!r} cannot be used: {err}"
        except httpx.ConnectError as err:
            return RunStatus.FAILED, f"{where}: cannot connect: {err}"
        except httpx.HTTPError as err:
            return RunStatus.FAILED, f"{where}: {type(err).__name__}: {err}"
        code = response.status_code
        if request.expected(code):
            return RunStatus.SUCCEEDED, f"HTTP {code}"
        return RunStatus.FAILED, f"HTTP {code}, expected {request.expected_text}"

    def _http_client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                verify=_tls_context(),
                limits=httpx.Limits(max_connections=None, keepalive_expiry=self.http_keep_alive),
            )
            # A job's server must not set cookies that the next job (another task) sends.
            self._http.cookies.jar.set_policy(
                http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
            )
        return self._http


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every HTTP job: building one (loading the CA bundle) per job cost
    tens of ms of CPU on the node's event loop (encode/httpx#3627)."""
    return ssl.create_default_context()


# --- payloads ---------------------------------------------------------------------------------


def _check(name: str, value: object, ok: bool, expected: str) -> None:
    if not ok:
        raise ValidationError(name, value, expected)


def _read_result(path: str) -> tuple[str, str]:
    """The JSON a job wrote to AYS_RESULT_FILE ("" for none), and what was wrong with it."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JOB_RESULT_BYTES + 1)
    except OSError as err:
        return "", f"result file not read: {err.strerror}"
    if not data.strip():
        return "", ""
    if len(data) > MAX_JOB_RESULT_BYTES:
        return "", f"result file over {MAX_JOB_RESULT_BYTES} bytes: not kept"
    try:
        text = data.decode()
        json.loads(text)
    except ValueError:
        return "", "result file is not JSON: not kept"
    return text.strip(), ""


def _shell_job(spec: JobSpec) -> tuple[str, dict[str, str], str]:
    """(command, environment, workdir) of a shell job, or _Invalid naming the field (the
    rules of `limits`, which the manager applies when the task is saved)."""
    payload = spec.payload
    command = payload.get("command")
    if not isinstance(command, str) or not command.strip():
        raise _Invalid("payload.command is missing or empty: give the shell command to run")
    task_env = _task_env(payload.get("env"))
    try:
        limits.check_command(command)
        limits.check_exec_size(command, task_env)
    except ValueError as err:
        raise _Invalid(f"payload.command: {err}") from None
    env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("LANG", DEFAULT_LANG)
    env.setdefault("HOME", os.path.expanduser("~"))
    env.update(task_env)
    if "\0" in spec.params:
        raise _Invalid("params: must not contain a NUL byte (it is passed as AYS_PARAMS)")
    env.update(
        AYS_JOB_ID=str(spec.job_id),
        AYS_TASK_ID=str(spec.task_id),
        AYS_PARAMS=spec.params,
        AYS_SHARD_INDEX=str(spec.shard_index),
        AYS_SHARD_TOTAL=str(spec.shard_total),
        AYS_ATTEMPT=str(spec.attempt),
        AYS_SCHEDULED_AT=spec.scheduled_at,
        AYS_PARENT_RESULTS=spec.parent_results or "{}",
    )
    workdir = payload.get("workdir") or ""
    if not isinstance(workdir, str):
        raise _Invalid(f"payload.workdir must be a path, got {type(workdir).__name__}")
    if not workdir:
        workdir = env["HOME"] if os.path.isdir(env["HOME"]) else "/"
    elif not os.path.isabs(workdir):
        raise _Invalid(f"workdir {workdir} is not an absolute path")
    else:
        try:
            limits.check_workdir(workdir)
        except ValueError as err:
            raise _Invalid(f"payload.workdir: {err}") from None
    return command, env, workdir


def _task_env(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(f"payload.env must be a mapping of names to values, got {value!r}")
    env = {}
    for name, raw in value.items():
        if not isinstance(name, str) or not limits.ENV_NAME.match(name):
            raise _Invalid(f"payload.env: {name!r} is not a variable name (letters, digits, _)")
        if isinstance(raw, bool) or not isinstance(raw, str | int | float):
            raise _Invalid(f"payload.env.{name}: value must be a string, got {raw!r}")
        env[name] = str(raw)
    try:
        limits.check_env(env)
    except ValueError as err:
        raise _Invalid(f"payload.env.{err}") from None
    return env


@dataclass(frozen=True)
class _HttpRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: dict[str, Any]  # keyword arguments for httpx: content= or json=, or nothing
    expected_codes: frozenset[int] | None  # None: any 2xx

    def expected(self, code: int) -> bool:
        if self.expected_codes is None:
            return 200 <= code <= 299
        return code in self.expected_codes

    @property
    def expected_text(self) -> str:
        if self.expected_codes is None:
            return "2xx"
        return " or ".join(str(code) for code in sorted(self.expected_codes))


def _http_job(spec: JobSpec) -> _HttpRequest:
    payload = spec.payload
    url = payload.get("url")
    if not isinstance(url, str) or not url.strip():
        raise _Invalid("payload.url is missing or empty: give the URL to call")
    method = payload.get("method") or "GET"
    if not isinstance(method, str) or not method.isalpha():
        raise _Invalid(f"payload.method {method!r} is not an HTTP method (GET, POST, ...)")
    headers = payload.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise _Invalid("payload.headers must map header names to string values")
    body = payload.get("body")
    if body is None:
        kwargs: dict[str, Any] = {}
    elif isinstance(body, str):
        kwargs = {"content": body.encode()}
    else:
        kwargs = {"json": body}
    return _HttpRequest(method.upper(), url.strip(), headers, kwargs, _expected_codes(payload))


def _expected_codes(payload: dict[str, Any]) -> frozenset[int] | None:
    value = payload.get("expected_status")
    if value is None:
        return None
    codes = value if isinstance(value, list) else [value]
    if not codes or not all(
        isinstance(c, int) and not isinstance(c, bool) and 100 <= c <= 599 for c in codes
    ):
        raise _Invalid(
            f"payload.expected_status {value!r} is not valid: an HTTP status code or a list "
            "of them, e.g. 200 or [200, 204]"
        )
    return frozenset(codes)


# --- processes --------------------------------------------------------------------------------


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn that asks Linux to send the job's shell SIGTERM when the thread spawning
    it (here: the event loop's) ends; None elsewhere. libc is looked up here, in the parent:
    the child only calls it."""
    if sys.platform != "linux":
        return None
    prctl = _libc().prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


@functools.cache
def _death_signal_wrapper() -> tuple[str, ...]:
    """`setpriv --pdeathsig TERM --` (util-linux 2.33 and later), to put in front of a job's
    shell, or () when this host's setpriv lacks it (then the preexec_fn does it).

    A preexec_fn makes Python fork the whole node process (its page tables: about 2 ms of
    the event loop's CPU and 5 ms of its time per job, measured with a node's imports on
    2026-12-06), and a burst of shell jobs spawned one after the other; without one, Python
    spawns with vfork (0.3 ms, 1 ms), and setpriv asks for the signal in the child before it
    execs the shell (same process, same pid). What the preexec_fn has and setpriv has not:
    the check that the node did not die between the spawn and the request; a shell started
    in that instant outlives the node until the node's next start ends it (the run journal,
    written before the spawn) or, under systemd, at once (the unit's control group)."""
    if sys.platform != "linux":
        return ()
    setpriv = shutil.which("setpriv", path=DEFAULT_PATH)
    if setpriv is None:
        return ()
    wrapper = (setpriv, "--pdeathsig", "TERM", "--")
    try:
        probe = subprocess.run(
            [*wrapper, "/bin/true"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    return wrapper if probe.returncode == 0 else ()


def _exit_code(returncode: int | None) -> int | None:
    if returncode is None:
        return None
    return returncode if returncode >= 0 else 128 - returncode


def _exit_status(returncode: int | None) -> tuple[RunStatus, str]:
    code = _exit_code(returncode)
    if code == 0:
        return RunStatus.SUCCEEDED, "exited with code 0"
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-returncode}"
        return RunStatus.FAILED, f"ended by {name} (exit code {code})"
    return RunStatus.FAILED, f"exited with code {code}"


def _descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of `pid`, found before signalling: those that moved to a session
    of their own are out of reach of killpg but not of this list."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _group_members(pgid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []  # the common case, answered without a scan
    except PermissionError:
        pass  # someone's in there; look
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (OSError, psutil.Error):
            continue  # gone meanwhile
    return members


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def _all_gone(pgid: int, targets: list[psutil.Process], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not _group_members(pgid) and not any(_alive(p) for p in targets):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_INTERVAL)


def _signal(pgid: int, targets: list[psutil.Process], sig: signal.Signals) -> None:
    """Send `sig` to process group `pgid` and to each of `targets` that still lives."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        log.warning("process group %d: not allowed to send %s", pgid, sig.name)
    for proc in targets:
        try:
            proc.send_signal(sig)  # psutil refuses a pid that was reused meanwhile
        except psutil.Error:
            continue
