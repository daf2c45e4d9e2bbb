"""A node's jobs beside the RocketMQ client: gRPC's threads must not kill a job's shell
between fork and exec (they did: `true` ended by SIGABRT, exit 134, in ~1% of runs under
load, its output gRPC's "epoll_wait error: Bad file descriptor")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter: gRPC reads its settings once, when it starts.
SPAWNER = """
import asyncio, sys, threading, time
from ays_runtime.transport import rocketmq_client as mq
from ays_runtime.node.executor import _parent_death_signal

mq.load_client(sys.argv[1], "test")
import grpc

def busy_grpc(until):
    channels = [grpc.insecure_channel("127.0.0.1:1") for _ in range(4)]
    while time.monotonic() < until:
        for channel in channels:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.05)
            except grpc.FutureTimeoutError:
                pass

async def spawn():
    proc = await asyncio.create_subprocess_exec(
        "true", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        preexec_fn=_parent_death_signal(),
    )
    return await proc.wait()

async def main():
    until = time.monotonic() + float(sys.argv[2])
    for _ in range(4):
        threading.Thread(target=busy_grpc, args=(until + 5,), daemon=True).start()
    codes = []
    while time.monotonic() < until:
        codes += await asyncio.gather(*(spawn() for _ in range(16)))
    print(len(codes), sum(1 for c in codes if c != 0))

asyncio.run(main())
"""


def test_job_shells_spawned_while_the_rocketmq_client_is_busy_all_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SPAWNER, str(tmp_path), "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    spawned, failed = map(int, done.stdout.split())
    assert spawned >= 100, f"only {spawned} shells spawned: {done.stderr[-500:]}"
    assert failed == 0, f"{failed} of {spawned} shells died before exec: {done.stderr[-500:]}"
