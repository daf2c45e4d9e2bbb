"""The alert service of one manager: judges stored runs, queues notices, delivers them.

Two loops in the manager's event loop, neither on the firing path:

- *judge*: waits for ids handed over by `runs_stored` (the run tracker's thread calls it after
  a commit), reads those runs and their predecessors, and queues the notices the rules raise;
- *deliver*: takes due rows from the queue (leased), sends each through its channel, and
  books the outcome: sent, or tried again after `alerts.retry_first` x 2^n (at most
  `alerts.retry_max`), or failed after `alerts.max_attempts` tries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

import httpx
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from ays_runtime.alerts import outbox, rules
from ays_runtime.alerts.base import Channel, DeliveryFailed
from ays_runtime.alerts.mail import Mail
from ays_runtime.alerts.settings import AlertSettings, WebhookChannel
from ays_runtime.alerts.watch import Watcher
from ays_runtime.alerts.webhook import Webhook
from ays_runtime.exceptions import ValidationError
from ays_runtime.metrics import manager as metrics
from ays_runtime.storage.database import utcnow

log = logging.getLogger("ays.alerts")

POLL = 1.0  # seconds between looks at the queue when nothing woke the loop
BATCH = 50


class AlertService:
    def __init__(self, engine: Engine, settings: AlertSettings, env: str, manager_id: str) -> None:
        self.engine = engine
        self.settings = settings
        self.env = env
        self.manager_id = manager_id
        self.who = f"manager {manager_id}: alerts"
        self._client = httpx.AsyncClient()
        self.channels: dict[str, Channel] = {
            c.name: Webhook(c, self._client) if isinstance(c, WebhookChannel) else Mail(c, env)
            for c in settings.channels
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stored: list[int] = []
        self._judge_wake = asyncio.Event()
        self._deliver_wake = asyncio.Event()
        self._failing: set[str] = set()  # channels whose last try failed (logged once)

    @property
    def active(self) -> bool:
        return bool(self.settings.channels)

    def runs_stored(self, job_ids: Sequence[int]) -> None:
        """Runs were just stored with a final status. Thread-safe, no I/O, never raises."""
        loop = self._loop
        if job_ids and loop is not None and self.settings.rules and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(self._take_ids, list(job_ids))

    def _take_ids(self, job_ids: list[int]) -> None:
        self._stored.extend(job_ids)
        self._judge_wake.set()

    async def test(self, channel: str) -> int:
        """Queue a test notice for `channel`; the delivery's id."""
        if channel not in self.channels:
            known = ", ".join(self.channels) or "none (declare them under alerts.channels)"
            raise ValidationError("channel", channel, f"the name of a channel; known: {known}")
        now = utcnow()
        summary = f"test notice from manager {self.manager_id} (env {self.env})"
        document = {"rule": "test", "kind": "test", "summary": summary}
        notice = outbox.Queued(
            f"test:{uuid.uuid4().hex}",
            "test",
            "test",
            summary,
            rules.payload(document, self.env, self.manager_id, now),
            [channel],
        )

        def write() -> int | None:
            with self.engine.begin() as conn:
                outbox.queue(conn, [notice], now)
                return outbox.delivery_id(conn, notice.dedup_key, channel)

        delivery = await asyncio.to_thread(write)
        assert delivery is not None
        self._deliver_wake.set()
        return delivery

    # --- the loops -----------------------------------------------------------------------

    async def run(self) -> None:
        """Judge and deliver until cancelled."""
        self._loop = asyncio.get_running_loop()
        try:
            if self.active:  # no channel: no rule either, nothing to judge or deliver
                loops = [self._judge_loop(), self._deliver_loop()]
                if any(rule.periodic for rule in self.settings.rules):
                    loops.append(self._watch_loop())
                await asyncio.gather(*loops)
        finally:
            await self._client.aclose()

    async def _judge_loop(self) -> None:
        while True:
            await self._judge_wake.wait()
            self._judge_wake.clear()
            job_ids, self._stored = self._stored, []
            try:
                queued = await asyncio.to_thread(self._judge, job_ids)
            except SQLAlchemyError as err:  # the database is away: these runs go unjudged
                log.error("%s: cannot judge %d runs: %s", self.who, len(job_ids), _reason(err))
                await asyncio.sleep(POLL)
                continue
            if queued:
                self._deliver_wake.set()

    async def _watch_loop(self) -> None:
        watcher = Watcher(self.settings)
        while True:
            await asyncio.sleep(self.settings.watch_interval)
            try:
                queued = await asyncio.to_thread(self._watch, watcher)
            except SQLAlchemyError as err:  # the next look sees the same state
                log.warning("%s: cannot look at nodes and runs: %s", self.who, _reason(err))
                continue
            if queued:
                self._deliver_wake.set()

    def _watch(self, watcher: Watcher) -> int:
        now = utcnow()
        with self.engine.begin() as conn:
            return self._queue_raised(conn, watcher.look(conn, now), now)

    def _judge(self, job_ids: list[int]) -> int:
        now = utcnow()
        with self.engine.begin() as conn:
            return self._queue_raised(conn, rules.judge(conn, self.settings, job_ids, now), now)

    def _queue_raised(self, conn: Connection, raised: list[rules.Raised], now: datetime) -> int:
        notices = [
            outbox.Queued(
                r.dedup_key,
                r.rule.name,
                r.kind,
                r.summary,
                rules.payload(r.document, self.env, self.manager_id, now),
                r.rule.channels,
            )
            for r in raised
        ]
        outbox.queue(conn, notices, now)
        for r in raised:
            log.info("%s: %s %s: %s", self.who, r.kind, r.rule.name, r.summary)
        return len(notices)

    async def _deliver_loop(self) -> None:
        while True:
            try:
                taken = await asyncio.to_thread(outbox.take_due, self.engine, utcnow(), BATCH)
            except SQLAlchemyError as err:
                log.warning("%s: cannot read the queue: %s", self.who, _reason(err))
                taken = []
            await asyncio.gather(*(self._deliver(*item) for item in taken))
            if len(taken) == BATCH:
                continue
            self._deliver_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._deliver_wake.wait(), POLL)

    async def _deliver(self, channel_name: str, attempts: int, notice: outbox.Notice) -> None:
        channel = self.channels.get(channel_name)
        error: str | None = None
        if channel is None:
            error = f"no channel named {channel_name} in this manager's alerts.channels"
        else:
            try:
                await channel.send(notice)
            except DeliveryFailed as failed:
                error = str(failed)
        now = utcnow()
        retry_at = None
        if error is not None and attempts + 1 < self.settings.max_attempts:
            retry_at = now + timedelta(seconds=self._backoff(attempts))
        self._log_outcome(channel_name, notice, error, retry_at)
        outcome = "sent" if error is None else "retry" if retry_at is not None else "failed"
        metrics.ALERT_DELIVERIES.labels(channel_name, outcome).inc()
        try:
            await asyncio.to_thread(
                outbox.settle, self.engine, notice.delivery_id, now, error, retry_at
            )
        except SQLAlchemyError as err:  # the lease ends and the row is tried again
            log.warning(
                "%s: delivery %d not booked: %s", self.who, notice.delivery_id, _reason(err)
            )

    def _backoff(self, attempts: int) -> float:
        return min(self.settings.retry_first * 2 ** min(attempts, 30), self.settings.retry_max)

    def _log_outcome(
        self, channel: str, notice: outbox.Notice, error: str | None, retry_at: datetime | None
    ) -> None:
        if error is None:
            if channel in self._failing:
                self._failing.discard(channel)
                log.info("%s: channel %s takes notices again", self.who, channel)
            return
        if retry_at is None:
            log.error(
                "%s: gave up delivery %d (%s) to channel %s: %s",
                self.who,
                notice.delivery_id,
                notice.summary[:100],
                channel,
                error,
            )
        elif channel not in self._failing:
            self._failing.add(channel)
            log.warning(
                "%s: channel %s does not take notices (%s); they stay queued and are retried",
                self.who,
                channel,
                error,
            )


def _reason(err: SQLAlchemyError) -> object:
    return getattr(err, "orig", None) or err
