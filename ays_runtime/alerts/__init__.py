"""Alert policies: channels x rules, off the hot path, nothing lost.

The contract:

- **Rules** (`rules.py`) look at runs once they are stored with a final status: `run_failed`
  (a run failed, timed out or lost its node, and no retry follows) and
  `consecutive_failures` (`count` such runs of a task in a row: once per streak). A rule
  watches some tasks or node groups (none named: all), may notify when the task recovers
  (its next run succeeds), and sends nothing inside its silence windows. Rules read the job
  log only: they keep no state of their own, so a restart or a second manager judges alike.
- **Notices are queued in the database** (`outbox.py`, table `ays_alert_delivery`), one row per
  notice and channel, keyed by what the notice is about (`dedup_key`: the rule and the run, or
  the streak): the same notice is never queued twice, whichever manager sees it.
- **Deliveries** (`service.py`) take queued rows with a lease, send them through the channel
  (`webhook.py`: a JSON POST with an HMAC-SHA256 signature; `mail.py`: SMTP, STARTTLS and
  AUTH), and retry what failed with backoff (`alerts.retry_first` .. `alerts.retry_max`) until
  the channel takes it: a channel that is down gets its notices when it is back, and a manager
  restart loses none.
- **Never on the hot path**: the run tracker only hands the ids of runs it just stored to
  `AlertService.runs_stored` (thread-safe, no I/O, never raises); everything else happens in
  the service's own task. Runs stored in the moment before a crash may go unjudged; their
  queued notices never are lost.
- **Policies** come from the env file and from the database (`policies.py`: channels, rules
  and silences made through the API, the console or the CLI; secrets write-only; every
  change audited); the service re-reads them on each change and every few seconds, and a
  rule whose check raises (not the database) is counted and skipped, never stopping it.
- The API (`api.py`): the policies' CRUD, silences, open alerts, deliveries, a test notice
  through one channel; the console's page is `ays_runtime/console/alerts.py`.
"""
