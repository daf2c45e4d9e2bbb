"""Logging as the daemons set it up (`ays_runtime.logs`), in a process of its own each time
so that this test run's own logging is left alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


LOG_SOME = """
    import logging, sys
    from ays_runtime.logs import configure_logging
    configure_logging(debug={debug}, debug_loggers={asked!r})
    logging.getLogger("ays.node").debug("ours at debug")
    logging.getLogger("ays.node").info("ours at info")
    logging.getLogger("grpc._cython.cygrpc").debug("grpc at debug")
    logging.getLogger("grpc._cython.cygrpc").info("grpc at info")
    logging.getLogger("httpx").info("httpx at info")
"""


@pytest.mark.parametrize(
    ("debug", "asked", "shown"),
    [
        (True, [], ["ours at debug", "ours at info", "grpc at info"]),
        (False, [], ["ours at info", "grpc at info"]),
        (True, ["grpc"], ["ours at debug", "ours at info", "grpc at debug", "grpc at info"]),
        (
            True,
            ["all"],
            ["ours at debug", "ours at info", "grpc at debug", "grpc at info", "httpx at info"],
        ),
    ],
)
def test_debug_mode_shows_our_debug_lines_and_a_librarys_only_when_asked(
    tmp_path: Path, debug: bool, asked: list[str], shown: list[str]
) -> None:
    done = run_python(LOG_SOME.format(debug=debug, asked=asked), tmp_path)
    assert done.returncode == 0, done.stderr
    messages = [line.split(": ", 1)[1] for line in done.stderr.splitlines()]
    assert messages == shown


def test_the_rocketmq_clients_failing_callbacks_go_to_its_log_with_one_line_in_ours(
    tmp_path: Path,
) -> None:
    """The client's heartbeat callback re-raises gRPC's error in a concurrent.futures
    callback, which logs a traceback each time (every 10 s while the proxy is away)."""
    pytest.importorskip("rocketmq")
    code = f"""
        import concurrent.futures, grpc, grpc.aio
        from pathlib import Path
        from ays_runtime.logs import configure_logging
        from ays_runtime.transport import rocketmq_client as mq

        configure_logging(debug=True, log_file=Path({str(tmp_path / "ays.log")!r}))
        mq.load_client({str(tmp_path)!r}, "manager 127.0.0.1:18080")

        def heartbeat_callback(future):
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, details="connect failed")

        for _ in range(3):
            future = concurrent.futures.Future()
            future.add_done_callback(heartbeat_callback)
            future.set_result(None)

        def a_bug_of_ours(future):
            raise ValueError("not a gRPC error")

        future = concurrent.futures.Future()
        future.add_done_callback(a_bug_of_ours)
        future.set_result(None)
    """
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    ours = (tmp_path / "ays.log").read_text()
    assert "AioRpcError" not in ours
    summary = (
        "manager 127.0.0.1:18080: the RocketMQ client's calls to the proxy fail (UNAVAILABLE); "
        f"their tracebacks go to {tmp_path / 'rocketmq_client.log'} until it answers"
    )
    # Three failures in a row, microseconds apart: one outage (no timing involved).
    assert ours.count(summary) == 1, ours
    assert "ValueError: not a gRPC error" in ours  # other callbacks' failures stay ours
    theirs = (tmp_path / "rocketmq_client.log").read_text()
    assert "exception calling callback" in theirs and "AioRpcError" in theirs
