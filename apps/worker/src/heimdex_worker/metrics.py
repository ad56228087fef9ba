"""The worker's Prometheus metrics, built by the entrypoint in a registry it owns."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram


@dataclass
class WorkerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.transitions = Counter(
            "heimdex_job_transitions_total",
            "Job status transitions made by this process",
            ["type", "from_status", "to_status"],
            registry=self.registry,
        )
        self.attempt_seconds = Histogram(
            "heimdex_job_attempt_duration_seconds",
            "Wall time of job attempts, from claim to outcome",
            ["type", "outcome"],
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
        )
        self.dispatched = Counter(
            "heimdex_outbox_dispatched_total",
            "Outbox messages published to the broker",
            registry=self.registry,
        )
        self.reaped = Counter(
            "heimdex_leases_reaped_total",
            "Running jobs whose lease expired and were returned to the queue or dead-lettered",
            registry=self.registry,
        )
