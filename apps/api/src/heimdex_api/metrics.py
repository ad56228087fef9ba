"""`/metrics`: ledger gauges read from PostgreSQL at scrape time, plus this process's counters."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from heimdex_common.ledger.outbox import outbox_stats
from heimdex_common.models import Job

logger = logging.getLogger(__name__)


class LedgerCollector(Collector):
    """Jobs by status and type, and the outbox backlog, as the database holds them now.

    Read at scrape time so every API replica reports the same truth, whichever process made
    the transitions. The GROUP BY scans `job`; scrape at a modest interval on large ledgers.
    """

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self._factory = factory

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("heimdex_jobs", "Jobs in the ledger", labels=["status", "type"])
        pending = GaugeMetricFamily("heimdex_outbox_pending", "Outbox messages not yet sent")
        lag = GaugeMetricFamily(
            "heimdex_outbox_lag_seconds", "Age of the oldest due, unsent outbox message"
        )
        try:
            with self._factory() as session:
                rows = session.execute(
                    select(Job.status, Job.type, func.count()).group_by(Job.status, Job.type)
                ).all()
                stats = outbox_stats(session)
        except Exception:
            logger.warning("ledger metrics unavailable", extra={"action": "metrics.db_error"})
            return
        for status, type_, count in rows:
            jobs.add_metric([status.value, type_], count)
        pending.add_metric([], stats.pending)
        lag.add_metric([], stats.oldest_due_seconds)
        yield from (jobs, pending, lag)


class ApiMetrics:
    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(LedgerCollector(factory))
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
        self.transitions = Counter(
            "heimdex_job_transitions_total",
            "Job status transitions made by this process",
            ["type", "from_status", "to_status"],
            registry=self.registry,
        )
