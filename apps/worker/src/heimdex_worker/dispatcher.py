"""The dispatcher process: drains the outbox into Redis and reaps expired leases."""

from __future__ import annotations

import logging
import threading
import time

import dramatiq
from sqlalchemy.orm import Session, sessionmaker

from heimdex_common.db import unit_of_work
from heimdex_common.ledger import outbox, service
from heimdex_common.models import JobOutbox
from heimdex_common.settings import Settings
from heimdex_worker.broker import delivery_message
from heimdex_worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

SENT_RETENTION_SECONDS = 24 * 3600
PURGE_EVERY_SECONDS = 600


class Dispatcher:
    """One pass at a time: `dispatch()` publishes due messages, `reap()` requeues dead leases.

    Several dispatchers may run: the outbox and the reaper both lock rows with SKIP LOCKED.
    """

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        broker: dramatiq.Broker,
        *,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.broker = broker
        self.metrics = metrics or WorkerMetrics()
        self.policy = service.RetryPolicy(
            base_seconds=settings.backoff_base_seconds,
            max_seconds=settings.backoff_max_seconds,
            queue_name=settings.queue_name,
        )
        self._last_error: str | None = None

    def _publish(self, message: JobOutbox) -> None:
        self.broker.enqueue(delivery_message(str(message.job_id), message.queue_name))

    def dispatch(self) -> int:
        with unit_of_work(self.factory) as session:
            result = outbox.dispatch_due(session, self._publish, limit=self.settings.dispatch_batch)
        self.metrics.dispatched.inc(result.sent)
        if result.error != self._last_error:
            if result.error:
                logger.warning(
                    "broker unavailable; messages stay in the outbox",
                    extra={"action": "dispatcher.publish_failed", "error": result.error},
                )
            else:
                logger.info("broker reachable again", extra={"action": "dispatcher.recovered"})
            self._last_error = result.error
        return result.sent

    def reap(self) -> int:
        with unit_of_work(self.factory) as session:
            reaped = service.reap_expired_leases(
                session, policy=self.policy, stale_after_seconds=self.settings.lease_seconds
            )
            for job in reaped:
                logger.warning(
                    "lease expired",
                    extra={
                        "action": "reaper.requeued",
                        "job_id": str(job.id),
                        "next_status": job.status.value,
                        "attempt": job.attempt,
                    },
                )
        self.metrics.reaped.inc(len(reaped))
        return len(reaped)

    def purge(self) -> int:
        with unit_of_work(self.factory) as session:
            return outbox.purge_sent(session, older_than_seconds=SENT_RETENTION_SECONDS)

    def run(self, stop: threading.Event) -> None:
        """Loop until `stop` is set. A failing pass is logged and retried on the next tick."""
        next_reap = next_purge = 0.0
        while not stop.is_set():
            sent = 0
            try:
                sent = self.dispatch()
                now = time.monotonic()
                if now >= next_reap:
                    self.reap()
                    next_reap = now + self.settings.reaper_interval_seconds
                if now >= next_purge:
                    self.purge()
                    next_purge = now + PURGE_EVERY_SECONDS
            except Exception:
                logger.exception("dispatcher pass failed", extra={"action": "dispatcher.error"})
            if sent < self.settings.dispatch_batch:
                stop.wait(self.settings.dispatch_interval_seconds)
