"""Prometheus metrics every Heimdex process exposes, built by its entrypoint (never at import).

`heimdex_job_transitions_total` counts the transitions this process made, as the ledger reports
them once committed (`ledger.transitions`); `heimdex_queue_*` read the queue from PostgreSQL
(unfinished rows only, cached for a few seconds), so every API replica and worker reports the
same truth an operator alerts on. Given `heimdex.replica.ReadEngines`, they read the streaming
replica of `HEIMDEX_READ_DATABASE_URL` while it is within its lag bound (the primary otherwise),
and `heimdex_replica_lag_seconds` reports its lag.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine

from heimdex.ledger import transitions
from heimdex.ledger.repository import QueueStats, queue_stats
from heimdex.ledger.retention import PruneResult
from heimdex.ledger.transitions import Transition
from heimdex.models import JobStatus
from heimdex.replica import ReadEngines

logger = logging.getLogger(__name__)

QUEUE_STATS_TTL_SECONDS = 5.0


class QueueCollector(Collector):
    """Queue depth, due jobs, running jobs and the oldest due job's age, per type."""

    def __init__(
        self, read: Callable[[], list[QueueStats]], ttl: float = QUEUE_STATS_TTL_SECONDS
    ) -> None:
        self._read = read
        self._ttl = ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, list[QueueStats]] | None = None

    def _stats(self) -> list[QueueStats] | None:
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self._ttl:
                return self._cached[1]
            try:
                stats = self._read()
            except Exception:
                logger.warning("queue metrics unavailable", extra={"action": "metrics.db_error"})
                return None
            self._cached = (now, stats)
            return stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        if stats is None:
            return
        families = {
            "queued": GaugeMetricFamily(
                "heimdex_queue_jobs", "Queued jobs (due or scheduled later)", labels=["type"]
            ),
            "due": GaugeMetricFamily(
                "heimdex_queue_due_jobs", "Queued jobs whose due time has come", labels=["type"]
            ),
            "running": GaugeMetricFamily(
                "heimdex_running_jobs", "Jobs running now", labels=["type"]
            ),
            "oldest": GaugeMetricFamily(
                "heimdex_queue_oldest_due_seconds",
                "How long the oldest due job has waited (0 when none is due)",
                labels=["type"],
            ),
        }
        for s in stats:
            families["queued"].add_metric([s.type], s.queued)
            families["due"].add_metric([s.type], s.due)
            families["running"].add_metric([s.type], s.running)
            families["oldest"].add_metric([s.type], s.oldest_due_seconds)
        yield from families.values()


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


class LedgerMetrics:
    """The registry of one process: its transition counter and the queue gauges.

    Given the process's engine, it hears every transition the ledger commits through it (one
    `LedgerMetrics` per engine) and reads the queue gauges with it, or through `reads` (the
    replica within its lag bound, see `heimdex.replica`), whose lag it then reports too."""

    def __init__(self, engine: Engine | None = None, *, reads: ReadEngines | None = None) -> None:
        self.registry = CollectorRegistry()
        self.transitions = Counter(
            "heimdex_job_transitions_total",
            "Job status transitions made by this process",
            ["type", "from_status", "to_status"],
            registry=self.registry,
        )
        self._children: dict[Transition, Counter] = {}
        if engine is not None:
            transitions.observe(engine, self.count)

            connect: Callable[[], Connection] = reads.connect if reads else engine.connect

            def read() -> list[QueueStats]:
                with connect() as conn:
                    return queue_stats(conn)

            self.registry.register(QueueCollector(read))
        if reads is not None:
            self.registry.register(ReplicaLag(reads))

    def count(self, changes: Mapping[Transition, int]) -> None:
        """Count committed transitions; an empty status label means outside the ledger (a
        submit comes from "", a job deleted by retention goes to "")."""
        for key, n in changes.items():
            child = self._children.get(key)
            if child is None:  # `labels()` costs a lock and a tuple build per call: resolve once
                child = self.transitions.labels(key.type, _label(key.before), _label(key.after))
                self._children[key] = child
            child.inc(n)


def _label(status: JobStatus | None) -> str:
    return status.value if status is not None else ""


class RetentionMetrics:
    """What the retention passes of this process deleted; registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter(
            "heimdex_retention_deleted_jobs_total",
            "Finished jobs deleted by retention, by status",
            ["status"],
            registry=registry,
        )
        self.events = Counter(
            "heimdex_retention_deleted_events_total",
            "Job events deleted by retention with their jobs",
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "heimdex_retention_batch_duration_seconds",
            "Wall time of one retention batch (one transaction)",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.passes = Counter(
            "heimdex_retention_passes_total",
            "Retention passes, by outcome (done, partial: more left, skipped: another pruner)",
            ["outcome"],
            registry=registry,
        )
        self.last_pass = Gauge(
            "heimdex_retention_last_pass_timestamp_seconds",
            "When this process last finished a retention pass",
            registry=registry,
        )

    def batch(self, status: JobStatus, jobs: int, events: int, seconds: float) -> None:
        self.jobs.labels(status.value).inc(jobs)
        self.events.inc(events)
        self.batch_seconds.observe(seconds)

    def finished(self, result: PruneResult) -> None:
        outcome = "skipped" if result.skipped else "done" if result.complete else "partial"
        self.passes.labels(outcome).inc()
        self.last_pass.set_to_current_time()
