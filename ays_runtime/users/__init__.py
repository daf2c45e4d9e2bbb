"""Users, roles and personal API tokens, and who may do what.

Contract:

* A user (`ays_user`) has a name, a role (`ays_runtime.vocabulary.Role`: viewer reads
  everything; operator also changes the tasks and runs of the node groups granted to them;
  admin does everything) and, to sign in to the console, a password kept as an argon2id hash
  (`passwords.py`, argon2-cffi). Users are changed through `service.py` only; every change
  (user created, updated, deleted; token created, revoked) is an audit-trail entry written in
  the change's own transaction, and never holds a password or a token.
* A personal API token (`ays_user_token`) is `ays_` + 43 random URL-safe characters (256
  bits), shown once when created; only its SHA-256 is stored, with its first 12 characters
  (`prefix`) to tell tokens apart. `service.authenticate_token` finds its user (constant-time
  comparison of the digests) and notes when it was last used; a revoked token (its row
  deleted) is refused by the next request.
* The env's `access_token` stays what it was: an "env token" with the rights of an admin,
  for the CLI on the manager's host, scripts and older nodes. The `cluster_secret`
  (`ays_runtime.auth`) is what managers and nodes present to each other; it opens only the
  routes nodes call (heartbeats, start claims, results) and the nodes' own API.
* `access.py` decides every request: a table maps each operation (method and route path of
  the manager's API and console) to the least role that may call it, group-scoped for
  operators where the operation acts on a task or a run; one FastAPI dependency applies it to
  every route of the app. A route missing from the table is refused (403) and fails the
  table-driven test (tests/test_users.py).
* `api.py`: /api/v1/users (admin), /api/v1/users/{name}/tokens (admin), /api/v1/me and
  /api/v1/me/tokens (any user, for their own tokens).
"""
