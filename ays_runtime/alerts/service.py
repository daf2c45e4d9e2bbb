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
from sqlalchemy.orm import Session

from ays_runtime.alerts import outbox, policies, rules
from ays_runtime.alerts.base import Channel, DeliveryFailed
from ays_runtime.alerts.mail import Mail
from ays_runtime.alerts.settings import AlertRule, AlertSettings, WebhookChannel
from ays_runtime.alerts.watch import Watcher
from ays_runtime.alerts.webhook import Webhook
from ays_runtime.exceptions import ValidationError
from ays_runtime.metrics import manager as metrics
from ays_runtime.storage.database import transaction, utcnow

log = logging.getLogger("ays.alerts")

POLL = 1.0  # seconds between looks at the queue when nothing woke the loop
POLICY_REFRESH = 5.0  # seconds between reads of the policies stored through the API
BATCH = 50


class AlertService:
    def __init__(self, engine: Engine, settings: AlertSettings, env: str, manager_id: str) -> None:
        self.engine = engine
        self.settings = settings
        self.env = env
        self.manager_id = manager_id
        self.who = f"manager {manager_id}: alerts"
        self.env_settings = settings  # the env file's section; the API's are added
        self._client = httpx.AsyncClient()
        self.channels: dict[str, Channel] = {}
        self._use(settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stored: list[int] = []
        self._judge_wake = asyncio.Event()
        self._deliver_wake = asyncio.Event()
        self._failing: set[str] = set()  # channels whose last try failed (logged once)
        self._faulty: set[str] = set()  # rules whose check raised (logged once)
        self._policies_failed = False  # reading the stored policies raised (logged once)

    def _use(self, settings: AlertSettings) -> None:
        """Run with `settings` (channel clients are made again only for changed channels)."""
        kept = {c.name: c for c in self.settings.channels} if self.channels else {}
        channels: dict[str, Channel] = {}
        for c in settings.channels:
            if kept.get(c.name) == c and c.name in self.channels:
                channels[c.name] = self.channels[c.name]
            elif isinstance(c, WebhookChannel):
                channels[c.name] = Webhook(c, self._client)
            else:
                channels[c.name] = Mail(c, self.env)
        self.settings = settings
        self.channels = channels

    def refresh(self) -> None:
        """Read the channels, rules and silences stored through the API (blocking: call it in
        a thread). Raises SQLAlchemyError when the database is away."""
        with Session(self.engine) as session:
            merged = policies.settings(session, self.env_settings, utcnow())
        self._use(merged)

    async def reload(self) -> None:
        """The API changed a channel, rule or silence: run with it now (other managers see it
        within POLICY_REFRESH)."""
        await asyncio.to_thread(self.refresh)
        self._deliver_wake.set()

    def rule_failed(self, rule: AlertRule, err: Exception) -> None:
        """A rule's check raised (not the database): count it, log it once, go on."""
        metrics.ALERT_RULE_ERRORS.labels(rule.name).inc()
        if rule.name in self._faulty:
            return
        self._faulty.add(rule.name)
        log.error(
            "%s: rule %s (%s) failed and was skipped; the other rules go on; it is tried "
            "again at each look (counted in ays_alert_rule_errors_total, logged once): %s: %s",
            self.who,
            rule.name,
            rule.when,
            type(err).__name__,
            err,
            exc_info=err,
        )

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

        def write(conn: Connection) -> int | None:
            outbox.queue(conn, [notice], now)  # keyed: a second try queues it once
            return outbox.delivery_id(conn, notice.dedup_key, channel)

        what = f"{self.who}: queueing a test notice"
        delivery = await asyncio.to_thread(transaction, self.engine, write, what)
        assert delivery is not None
        self._deliver_wake.set()
        return delivery

    # --- the loops -----------------------------------------------------------------------

    async def run(self) -> None:
        """Judge and deliver until cancelled."""
        self._loop = asyncio.get_running_loop()
        try:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:  # the policy loop tries again; the env file's are in force
                log.exception("%s: reading the alert policies failed", self.who)
            await asyncio.gather(
                self._judge_loop(), self._deliver_loop(), self._watch_loop(), self._policy_loop()
            )
        finally:
            await self._client.aclose()

    async def _policy_loop(self) -> None:
        while True:
            await asyncio.sleep(POLICY_REFRESH)
            try:
                await asyncio.to_thread(self.refresh)
            except SQLAlchemyError as err:  # keep the policies known; the next look repairs
                log.warning("%s: cannot read the alert policies: %s", self.who, _reason(err))
            except Exception:  # never stop on a fault of ours: said once, the policies kept
                if not self._policies_failed:
                    log.exception("%s: reading the alert policies failed", self.who)
                self._policies_failed = True
            else:
                self._policies_failed = False

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
            except Exception:  # never stop judging on a fault of ours: said, then go on
                log.exception("%s: judging %d runs failed", self.who, len(job_ids))
                continue
            if queued:
                self._deliver_wake.set()

    async def _watch_loop(self) -> None:
        watcher = Watcher(self.settings)
        while True:
            await asyncio.sleep(self.settings.watch_interval)
            if not any(rule.periodic for rule in self.settings.rules):
                continue
            watcher.settings = self.settings
            try:
                queued = await asyncio.to_thread(self._watch, watcher)
            except SQLAlchemyError as err:  # the next look sees the same state
                log.warning("%s: cannot look at nodes and runs: %s", self.who, _reason(err))
                continue
            except Exception:  # never stop looking on a fault of ours: said, then go on
                log.exception("%s: looking at nodes and runs failed", self.who)
                continue
            if queued:
                self._deliver_wake.set()

    # Judging reads, then queueing writes in a transaction of its own: the watcher keeps
    # what it raised in memory, so a look run again would not raise it a second time.

    def _watch(self, watcher: Watcher) -> int:
        now = utcnow()
        with self.engine.connect() as conn:
            raised = watcher.look(conn, now, self.rule_failed)
        return self._queue_raised(raised, now)

    def _judge(self, job_ids: list[int]) -> int:
        now = utcnow()
        with self.engine.connect() as conn:
            raised = rules.judge(conn, self.settings, job_ids, now, self.rule_failed)
        return self._queue_raised(raised, now)

    def _queue_raised(self, raised: list[rules.Raised], now: datetime) -> int:
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
        if notices:  # keyed: a second try queues each once
            what = f"{self.who}: queueing {len(notices)} notice(s)"
            transaction(self.engine, lambda conn: outbox.queue(conn, notices, now), what)
        for r in raised:
            log.info("%s: %s %s: %s", self.who, r.kind, r.rule.name, r.summary)
        return len(notices)

    async def _deliver_loop(self) -> None:
        while True:
            if not self.active:  # no channel: nothing can be queued for one
                self._deliver_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._deliver_wake.wait(), POLL)
                continue
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
