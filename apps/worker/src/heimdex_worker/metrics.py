"""The worker's own metrics: attempts, claims, placed jobs, reaped leases (beside the ledger's
and the retention's, from `heimdex.metrics`)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Histogram

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

    def observe_attempt(self, type: str, outcome: str, seconds: float) -> None:
        key = (type, outcome)
        child = self._attempt_children.get(key)
        if child is None:
            child = self._attempt_children[key] = self.attempt_seconds.labels(type, outcome)
        child.observe(seconds)
