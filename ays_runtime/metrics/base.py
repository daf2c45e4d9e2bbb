"""What both roles' metrics share: the `/metrics` route, its access rule, the buckets."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

from fastapi import FastAPI, Response
from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ays_runtime.config import EnvConfig
from ays_runtime.web.guard import PublicRoutes

# No `_created` series beside each counter: Prometheus does not use them in the text format,
# and they double what a scrape carries.
disable_created_metrics()

PATH = "/metrics"
# The classic text format (0.0.4): what every Prometheus version and agent reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds, from a few milliseconds (a fire claimed in its batch) to ten minutes (a fire held
# up by an outage): the range lateness and run durations fall in.
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def public_routes(base: PublicRoutes, config: EnvConfig) -> PublicRoutes:
    """`base`, plus `/metrics` when the env opens it (`metrics.public: true`)."""
    if not config.metrics.public:
        return base
    return PublicRoutes(paths=base.paths | {PATH}, prefixes=base.prefixes)


def add_route(app: FastAPI, registry: CollectorRegistry, tag: str = "metrics") -> None:
    """`GET /metrics` on `app`: `registry` in the Prometheus text format."""

    # A plain def: FastAPI runs it in the thread pool, so collectors may query the database.
    @app.get(
        PATH,
        tags=[tag],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
    )
    def metrics() -> Response:
        """The Prometheus metrics of this process (text format 0.0.4)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)


S = TypeVar("S")


class StateCollector(Collector, Generic[S]):
    """Gauges of what is, computed at each scrape from the attached state (`attach`); none
    until a daemon attaches its state. Subclasses say how, in `families`."""

    def __init__(self) -> None:
        self.state: S | None = None

    def attach(self, state: S) -> None:
        self.state = state  # a process runs one manager or node: the last one wins

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # computed at collect time: nothing to declare ahead

    def collect(self) -> Iterable[GaugeMetricFamily]:
        state = self.state
        return [] if state is None else self.families(state)

    def families(self, state: S) -> Iterable[GaugeMetricFamily]:
        raise NotImplementedError


def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    """A gauge without labels, holding `value`."""
    family = GaugeMetricFamily(name, text)
    family.add_metric([], value)
    return family
