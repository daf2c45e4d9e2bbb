"""The audit trail: every change an operator makes, with who, when, from where, and the
definition before and after it.

Contract:

* `trail.record(session, actor, action, target, before=..., after=...)` adds one entry in the
  caller's transaction (a change is never stored without its entry, nor an entry without its
  change); `actor` is `ays_runtime.manager.versions.Actor` (who, through what, from where).
* What is recorded (`AuditAction`): tasks created, updated (enable/disable, rollback and a
  node group's rename included), deleted, triggered by hand; runs killed; node groups
  created, updated, deleted; nodes added and removed by hand; alert channels and rules
  created, updated, deleted, rules silenced and unsilenced (`ays_runtime.alerts.policies`,
  secrets left out). The task service functions, the alert policies' functions and the
  routes that act (trigger, kill, node add/remove) call `record`; nothing else writes the
  table.
* `trail.entries(...)` reads it, newest first, filtered and paged (GET /api/v1/audit);
  `trail.changed_fields` says which keys of a definition a change touched.
* Entries older than the env's `audit.retention_days` are purged by the manager's retention
  loop, as job logs are (`ays_runtime.manager.retention`).
"""
