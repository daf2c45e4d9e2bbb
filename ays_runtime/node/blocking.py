"""Block strategies: what a node does with a new run of a task while it still holds an
earlier run of that task (running, or waiting its turn).

The node decides for the runs it holds, as xxl-job's executor does; the manager only names
the strategy in each RunRequest:

    serial       the new run waits until every earlier run of the task on this node has ended
    discard_new  the new run is not started; it is reported *discarded*
                 ("previous run N still running")
    cover_old    the earlier runs are ended, reported *killed* ("covered by run M"), and the
                 new run starts once they have

`BlockGate` keeps the runs held per task, in the order they arrived. `enter()` decides at
once (it never waits, so arrival order is decision order); `wait_turn()` then waits until the
run may start, or says why it must not. Every entered run must `leave()`, whatever happened.
Runs of different tasks never wait for each other here (the executor bounds concurrency).
Used from one event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ays_runtime.storage.models import BlockStrategy

STRATEGIES = ", ".join(s.value for s in BlockStrategy)


def parse_strategy(value: str) -> BlockStrategy:
    """The strategy named `value`; ValueError naming the choices when it is unknown."""
    try:
        return BlockStrategy(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a block strategy: use one of {STRATEGIES}") from None


@dataclass(eq=False)
class Hold:
    """One run the node holds, from `enter()` to `leave()`."""

    job_log_id: int
    task_id: int
    after: list[Hold] = field(default_factory=list)  # earlier runs it waits for
    started: bool = False
    ended: bool = False
    stopped: str = ""  # why it must not start (covered, killed while waiting); "" if it may
    wake: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class Admission:
    """What `enter()` decided: a hold to wait on, or the reason the run is discarded."""

    hold: Hold | None
    discarded: str = ""
    # Earlier runs that have started and must be killed (cover_old); the caller kills them.
    cover: tuple[int, ...] = ()


class BlockGate:
    """The runs this node holds, per task, and the block strategy between them."""

    def __init__(self) -> None:
        self._lanes: dict[int, list[Hold]] = {}
        self._holds: dict[int, Hold] = {}

    def __contains__(self, job_log_id: int) -> bool:
        return job_log_id in self._holds

    def __len__(self) -> int:
        return len(self._holds)

    def enter(self, task_id: int, job_log_id: int, strategy: BlockStrategy) -> Admission:
        """Decide what happens to a new run of `task_id`. Never waits."""
        if job_log_id in self._holds:
            raise ValueError(f"run {job_log_id} is already held")
        earlier = list(self._lanes.get(task_id, ()))
        if earlier and strategy is BlockStrategy.DISCARD_NEW:
            return Admission(None, discarded=f"previous run {earlier[0].job_log_id} still running")
        hold = Hold(job_log_id, task_id, after=earlier)
        self._lanes.setdefault(task_id, []).append(hold)
        self._holds[job_log_id] = hold
        cover: list[int] = []
        if strategy is BlockStrategy.COVER_OLD:
            reason = f"covered by run {job_log_id}"
            for old in earlier:
                if old.started:
                    cover.append(old.job_log_id)
                else:
                    self._stop(old, reason)
        return Admission(hold, cover=tuple(cover))

    async def wait_turn(self, hold: Hold) -> str:
        """Wait until every earlier run of the task has left; then mark `hold` started and
        return "". Returns the reason instead when the run was stopped before it started."""
        while True:
            if hold.stopped:
                return hold.stopped
            if all(old.ended for old in hold.after):
                hold.started = True
                hold.after = []
                return ""
            hold.wake.clear()
            await hold.wake.wait()

    def stop_waiting(self, job_log_id: int, reason: str) -> bool:
        """Stop a held run that has not started; True when there was one."""
        hold = self._holds.get(job_log_id)
        if hold is None or hold.started or hold.stopped:
            return False
        self._stop(hold, reason)
        return True

    def stop_all_waiting(self, reason: str) -> int:
        """Stop every held run that has not started; return how many."""
        return sum(self.stop_waiting(job_log_id, reason) for job_log_id in list(self._holds))

    def leave(self, hold: Hold) -> None:
        """The run has ended (or never started): later runs of its task may go on."""
        hold.ended = True
        self._holds.pop(hold.job_log_id, None)
        lane = self._lanes.get(hold.task_id, [])
        if hold in lane:
            lane.remove(hold)
        if not lane:
            self._lanes.pop(hold.task_id, None)
        for later in lane:
            later.wake.set()

    @staticmethod
    def _stop(hold: Hold, reason: str) -> None:
        hold.stopped = reason
        hold.wake.set()
