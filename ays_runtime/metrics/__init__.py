"""Prometheus metrics of the manager and the nodes: `GET /metrics`, in the text format.

The contract:

- **One registry per process and role.** `metrics.manager.REGISTRY` holds the manager's
  series, `metrics.node.REGISTRY` the node's; neither is prometheus-client's global default
  registry, so a test process that builds several apps, or imports both roles, never meets a
  "duplicated timeseries" error, and one role's `/metrics` never shows the other's series.
  A daemon process is one manager or one node, so the module-level series are its own.
- **Instrumentation is one call at the spot where a thing happens** (`manager.fires_claimed`,
  `manager.run_dispatched`, `node.RESULT_RETRIES.inc()`, ...). Each is cheap (a counter or a
  histogram observation, no I/O), never raises, and never waits: firing is not slowed.
  The one exception, `manager.runs_finished`, hands the ids of runs just stored to the
  metrics thread, which reads them with one short query; a failure there is logged at debug
  and forgotten (a metric is never worth a lost result, nor a slower one).
- **State is read when scraped, not tracked.** Gauges of what *is* (nodes online per group,
  runs waiting, timers installed, jobs running, results spooled) are computed by a collector
  at scrape time from the process's own caches and, on the manager, one or two indexed
  `GROUP BY` counts; no call site has to keep them up to date. The daemon names the source
  once at start-up (`manager.attach(...)`, `node.attach(...)`); until then they are absent.
- **Names follow Prometheus' conventions**: the `ays_` prefix, base units (`_seconds`),
  counters end in `_total`, labels of low cardinality only (node group, status, trigger,
  stage, transport). A task id is a label only on the `ays_task_*` series, and only when the
  env asks for them (`metrics.task_labels: true`).
- **Access**: `/metrics` is guarded by the access token like every route, unless the env says
  `metrics.public: true` (`public_routes`). It is served from the thread pool: a scrape's
  database counts never hold the event loop.

The series are listed in the README (section Metrics) and drawn by the Grafana dashboard in
docs/grafana/ays.json.
"""
