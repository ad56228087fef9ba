"""`/metrics`: the ledger's metrics (queue gauges, transitions) plus this process's HTTP ones."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from heimdex.metrics import LedgerMetrics
from heimdex.replica import ReadEngines


class ReplicaLag(Collector):
    """The read replica's lag at its last check (absent without a replica, or while it does
    not answer)."""

    def __init__(self, reads: ReadEngines) -> None:
        self.reads = reads

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.reads.replica is None or self.reads.lag is None:
            return
        gauge = GaugeMetricFamily(
            "heimdex_replica_lag_seconds", "How far the read replica is behind the primary"
        )
        gauge.add_metric([], self.reads.lag)
        yield gauge


class ApiMetrics(LedgerMetrics):
    def __init__(self, engine: Engine | None = None, reads: ReadEngines | None = None) -> None:
        super().__init__(engine, gauges=reads)
        if reads is not None:
            self.registry.register(ReplicaLag(reads))
        self.requests = Counter(
            "heimdex_http_requests_total",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "heimdex_http_request_duration_seconds",
            "HTTP request duration",
            ["method", "route"],
            registry=self.registry,
        )
