"""The node's series (see the package docstring for the rules they keep).

Counted where things happen:

    ays_node_runs_finished_total{status}          runs this node ended (or refused to run)
    ays_node_result_deliveries_total{outcome}     results sent: delivered, refused (dropped:
                                                  can never succeed), retry (kept, sent again)
    ays_node_result_retries_total                 results the manager or broker did not take
                                                  at once, kept in the spool to send again
    ays_node_transport_errors_total{direction}    the broker's consume/publish failures

Read at scrape time (`StateCollector`, from what `attach` names):

    ays_node_jobs_running                         jobs running now
    ays_node_jobs_waiting                         jobs accepted, waiting for a slot or their
                                                  block strategy
    ays_node_slots                                jobs the node runs at once (max_concurrent_jobs)
    ays_node_slots_free                           slots neither running nor promised
    ays_node_spooled_results                      results on disk not yet taken by a manager
    ays_node_info{node_group,version}             1
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from ays_runtime import __version__
from ays_runtime.metrics import base

REGISTRY = CollectorRegistry(auto_describe=True)

RUNS_FINISHED = Counter(
    "ays_node_runs_finished",
    "Runs this node ended, by final status",
    ["status"],
    registry=REGISTRY,
)
RESULT_DELIVERIES = Counter(
    "ays_node_result_deliveries",
    "Results sent to a manager or the broker, by outcome (delivered, refused, retry)",
    ["outcome"],
    registry=REGISTRY,
)
RESULT_RETRIES = Counter(
    "ays_node_result_retries",
    "Results not taken at once, kept in the spool and sent again later",
    registry=REGISTRY,
)
TRANSPORT_ERRORS = Counter(
    "ays_node_transport_errors",
    "Broker failures: consume (jobs not received), publish (results not sent)",
    ["direction"],
    registry=REGISTRY,
)
for _outcome in ("delivered", "refused", "retry"):
    RESULT_DELIVERIES.labels(_outcome)
for _direction in ("consume", "publish"):
    TRANSPORT_ERRORS.labels(_direction)


def result_settled(outcome: str) -> None:
    """One result's delivery ended as `outcome` (a `Delivery` value: taken, retry, refused)."""
    RESULT_DELIVERIES.labels("delivered" if outcome == "taken" else outcome).inc()
    if outcome == "retry":
        RESULT_RETRIES.inc()


@dataclass(frozen=True)
class NodeState:
    """Where the scrape-time gauges come from: the running node's own counts."""

    group: str
    running: Callable[[], int]
    waiting: Callable[[], int]
    slots: Callable[[], int]
    spooled: Callable[[], int]


class StateCollector(base.StateCollector[NodeState]):
    """The node's gauges of what is, computed at each scrape."""

    def families(self, state: NodeState) -> Iterable[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "ays_node_info", "This node's group and Ays version", labels=["node_group", "version"]
        )
        info.add_metric([state.group, __version__], 1)
        yield info
        running, waiting, slots = state.running(), state.waiting(), state.slots()
        for name, text, value in (
            ("ays_node_jobs_running", "Jobs running now", running),
            ("ays_node_jobs_waiting", "Jobs accepted, waiting for a slot or their turn", waiting),
            ("ays_node_slots", "Jobs this node runs at once (node.max_concurrent_jobs)", slots),
            (
                "ays_node_slots_free",
                "Slots neither running nor promised",
                slots - running - waiting,
            ),
            ("ays_node_spooled_results", "Results on disk not yet taken", state.spooled()),
        ):
            yield base.gauge(name, text, max(value, 0))


STATE = StateCollector()
REGISTRY.register(STATE)


def attach(state: NodeState) -> None:
    """Name the running node's state for the scrape-time gauges (a process runs one node)."""
    STATE.attach(state)
