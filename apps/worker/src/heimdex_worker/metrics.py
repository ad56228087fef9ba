"""The worker's own metrics: attempts, claims, placed jobs, reaped leases, stuck handlers
(beside the ledger's and the retention's, from `heimdex.metrics`)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from heimdex.metrics import LedgerMetrics, RetentionMetrics


@dataclass
class WorkerMetrics:
    ledger: LedgerMetrics

    def __post_init__(self) -> None:
        self.attempt_seconds = Histogram(
            "heimdex_job_attempt_duration_seconds",
            "Wall time of job attempts, from claim to outcome",
            ["type", "outcome"],
            registry=self.ledger.registry,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
        )
        self.reaped = Counter(
            "heimdex_leases_reaped_total",
            "Running jobs whose lease expired and were returned to the queue or dead-lettered",
            registry=self.ledger.registry,
        )
        self._attempt_children: dict[tuple[str, str], Histogram] = {}
        self.retention = RetentionMetrics(self.ledger.registry)
        self.claims = Counter(
            "heimdex_claims_total",
            "Claim statements run by this worker",
            registry=self.ledger.registry,
        )
        self.placed = Counter(
            "heimdex_jobs_placed_total",
            "Jobs that came due unplaced (scheduled, retried, requeued) placed by this worker",
            registry=self.ledger.registry,
        )
        self.stuck = Gauge(
            "heimdex_worker_stuck_jobs",
            "Handlers that did not stop within the grace period after their deadline and still "
            "hold a thread of this worker (their jobs were released and retried)",
            registry=self.ledger.registry,
        )
        self.stuck_total = Counter(
            "heimdex_worker_stuck_attempts_total",
            "Attempts declared stuck by this worker, by job type",
            ["type"],
            registry=self.ledger.registry,
        )

    def observe_attempt(self, type: str, outcome: str, seconds: float) -> None:
        key = (type, outcome)
        child = self._attempt_children.get(key)
        if child is None:
            child = self._attempt_children[key] = self.attempt_seconds.labels(type, outcome)
        child.observe(seconds)
