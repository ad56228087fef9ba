"""`/metrics`: the ledger's metrics (queue gauges, transitions) plus this process's HTTP ones."""

from __future__ import annotations

from prometheus_client import Counter, Histogram
from sqlalchemy import Engine

from heimdex.metrics import LedgerMetrics
from heimdex.replica import ReadEngines


class ApiMetrics(LedgerMetrics):
    def __init__(self, engine: Engine | None = None, reads: ReadEngines | None = None) -> None:
        super().__init__(engine, reads=reads)
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
