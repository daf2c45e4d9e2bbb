"""Job dependencies: a task fires after other tasks' runs end (issue 18).

A task's `after` lists its parents, each with a condition (`AfterCondition`: success,
failure, always), and its `after_mode` (`AfterMode`) says how several parents combine. The
edges live in `ays_task_edge` (by parent name); `graph` keeps them, refuses a cycle when a
task is saved, and says which parents of a child are deleted or disabled. `triggers` decides
the children's fires when a parent's run ends.

The contract a parent's end keeps:

* **Only a slot's final outcome counts.** A parent slot (task, scheduled time) has ended when
  every shard's latest attempt is final; a run with a retry pending has not. Its outcome is
  `success` (all succeeded), `skipped` (all skipped: it was itself skipped by its parents),
  or `failure`.
* **In the same transaction.** The manager that stores the run's final status decides the
  children in that transaction (`runs.RunTracker._write_finals_in`): a child's fire is its
  job-log row, claimed there (pending, owned by that manager), so a manager killed after the
  commit leaves a pending row that its next start (`recover_pending`) or a peer adopting its
  runs dispatches; killed before the commit, the parent's result is not stored either, and
  the node reports it again. Dispatch goes through the manager's one dispatch path.
* **Exactly once.** A child's fire has the slot of the parent's run: its key is (child,
  parent's scheduled time), the job log's slot key, so two managers, a retry, a duplicate
  report or a restart fire it once.
* **`any`**: each parent slot whose outcome meets its edge's condition fires the child once
  (two parents ending the *same* slot share the child's slot: it fires once for it).
* **`all`** (fan-in): the child fires once for a slot when every parent's run of that slot
  has ended meeting its condition; as soon as one ended otherwise, the child's slot is
  written `skipped` ("skipped: parent X failed") and its own children are decided in turn
  (a skipped parent meets only `always`). Parents deleted or disabled are left out of the
  fan-in (and reported on the child, `graph.problems`). Each parent's end that meets its
  condition is counted once on the child's slot (`ays_fan_in_parent`'s key) and bumps the
  slot's count (`ays_fan_in`) under its row lock, so two parents ending at once on two
  managers are counted one after the other and the second sees the count complete (or one
  deadlocks and its transaction runs again: `database.transaction`). The parents' rows are
  read in full (a locking read) only when the slot's count row is created (counting the
  parents that ended before it) and when the count reaches the parents': O(n) for n parents.
* A disabled child is not fired (as a timer's fire would not be).
"""
