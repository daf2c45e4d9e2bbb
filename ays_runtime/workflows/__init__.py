"""Workflows: a named set of tasks started together, each start one workflow run (issue 18).

A workflow names its tasks; its edges are those tasks' `after` (ays_runtime.dependencies),
and its first tasks are those with no parent inside it. A start, by the workflow's schedule
or by hand (with params), is one `ays_workflow_run` row keyed by (workflow, slot): every task
of the run fires with that slot as its scheduled time and the run's params, so each task's
run is the job-log row (task, slot), exactly once as any fire. The first tasks are fired
through the scheduler's claim writer (the one fire path); their children by the dependency
triggers as their parents end, with the run's params.

The contract the package keeps:

* **Status** (`WorkflowRunStatus`) is read from the job log: `running` while a run of its
  tasks is unfinished or a first task has not fired yet; then `failed` if a task's last
  attempt failed (or the run timed out), `succeeded` if every task succeeded, else
  `partly_skipped` (a task skipped by its parents, or never fired: an `any` condition not
  met, a disabled task). A manager's sweep (`service.WorkflowService`, every second) writes
  the status when it settles, fires first tasks still missing (a manager stopped between
  the run's row and its fires), starts the schedules' due slots and ends timed-out runs.
* **Timeout**: a run still running past `timeout_s` has its unfinished runs killed and ends
  `failed` ("timed out after N s").
* **Rerun** of a failed run: each task whose last attempt failed fires again, as the next
  attempt of the same slot; the children it skipped fire again as it succeeds (a child's
  slot ended `skipped` fires as its next attempt: dependencies.triggers).
* A task belongs to one workflow at most; a workflow's schedule slots missed while no
  manager ran are not started afterwards.
"""
