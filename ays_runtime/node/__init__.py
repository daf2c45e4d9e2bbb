"""The executor node: runs the jobs the manager dispatches to it.

`executor` holds the job executor (shell commands and HTTP calls, bounded concurrency,
timeouts and kills that reach every process of a job); `output` the bounded output capture.
"""

from ays_runtime.node.executor import Executor, JobResult, JobSpec

__all__ = ["Executor", "JobResult", "JobSpec"]
