"""Writing the outcomes of ended attempts: parked per runner, handed to one writer at a time,
written in one statement (a transaction when some failed), then timed, logged and
forgotten."""

from __future__ import annotations

import logging
import threading
import time
import uuid

from sqlalchemy.exc import DBAPIError

from heimdex.ledger import service
from heimdex.ledger.repository import Outcome
from heimdex.models import JobStatus
from heimdex_worker.db import Lane, retrying
from heimdex_worker.held import Done, HeldJobs
from heimdex_worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

Written = tuple[set[uuid.UUID], list[Outcome]]
"""What an outcome write did: the ids of direct outcomes written, the failures' outcomes."""


class OutcomeWriter:
    """The outcomes of one worker process's attempts, from each runner's parking place to the
    ledger."""

    def __init__(
        self,
        lane: Lane,
        held: HeldJobs,
        *,
        policy: service.RetryPolicy,
        metrics: WorkerMetrics,
    ) -> None:
        # One writer at a time: a lane of one connection.
        self.lane = lane
        self.held = held
        self.policy = policy
        self.metrics = metrics
        # Ended attempts waiting for the runner that writes outcomes (see flush).
        self._outbox: list[Done] = []
        self._outbox_lock = threading.Lock()
        # Each runner's outcomes not handed to the writer yet (see Worker._run), where the
        # keeper can take them from (under _outbox_lock).
        self._parked: list[list[Done]] = []
        self._writing = False

    @property
    def waiting(self) -> bool:
        """Whether outcomes wait in the outbox (left by a keeper's failed write, or arrived
        while a writer was busy)."""
        return bool(self._outbox)

    def parking(self) -> list[Done]:
        """A runner's own parking place, where the keeper can find its outcomes too."""
        pending: list[Done] = []
        with self._outbox_lock:
            self._parked.append(pending)
        return pending

    def park(self, pending: list[Done], done: Done) -> None:
        with self._outbox_lock:
            pending.append(done)

    def unpark(self, pending: list[Done]) -> list[Done]:
        """What is parked in one runner's `pending`, taken out of it."""
        with self._outbox_lock:
            taken = list(pending)
            pending.clear()
        return taken

    def unpark_all(self) -> list[Done]:
        with self._outbox_lock:
            taken = [done for pending in self._parked for done in pending]
            for pending in self._parked:
                pending.clear()
        return taken

    def flush(self, ended: list[Done], *, keeper: bool = False) -> None:
        """Hand ended attempts to the writer; when no thread is writing, become it and write
        everything waiting (other runners' too) until nothing is left. One outcome statement in
        flight per process, with every outcome that ended meanwhile (concurrent writers cost
        PostgreSQL more per job), and no thread of its own to wake. The `keeper` must not stall
        its heartbeats: it writes one statement with one try (a failed write puts the outcomes
        back), and leaves what arrived meanwhile to the runners' next write or its next tick,
        instead of staying the writer while runners keep adding outcomes."""
        with self._outbox_lock:
            self._outbox.extend(ended)
            if self._writing:
                return
            self._writing = True
        while True:
            with self._outbox_lock:
                batch, self._outbox = self._outbox, []
                if not batch:
                    self._writing = False
                    return
            try:
                written = self._write(batch, retry=not keeper)
            except DBAPIError:
                with self._outbox_lock:
                    self._outbox[:0] = batch
                    self._writing = False
                return
            self._settle(batch, written)
            if keeper:
                with self._outbox_lock:
                    self._writing = False
                return

    def _write(self, pending: list[Done], *, retry: bool = True) -> Written:
        """Write the outcomes of ended attempts; one statement when none failed (failures read
        their rows for the retry rule: a transaction). Retried through an outage (`retry`): an
        outcome is never dropped while its lease may still be held."""
        direct = [o for _, o, _ in pending if isinstance(o, Outcome)]
        failures = [o for _, o, _ in pending if isinstance(o, service.Failure)]

        def write() -> Written:
            if not failures:
                with self.lane.autocommit() as conn:
                    return service.write_outcomes(conn, direct), []
            with self.lane.transaction() as conn:
                written = service.write_outcomes(conn, direct)
                return written, service.fail_attempts(conn, failures, policy=self.policy)

        result: Written = retrying("writing outcomes", write, give_up=lambda: not retry)
        return result

    def _settle(self, batch: list[Done], written_and_failed: Written) -> None:
        """Time, log and forget the attempts whose outcomes were just written (the ledger
        counts their transitions)."""
        written, failed = written_and_failed
        by_id = {o.job_id: o for o in failed}
        now = time.monotonic()
        for held, outcome, how in batch:
            label = how
            job = held.job
            ended = by_id.get(job.id) if isinstance(outcome, service.Failure) else outcome
            if isinstance(outcome, Outcome) and job.id not in written:
                ended = None
            if ended is None:
                logger.warning(
                    "lease lost; the attempt's outcome is void",
                    extra={"action": "worker.lease_lost", "job_id": str(job.id), "type": job.type},
                )
                label = "lease_lost"
            elif ended.status is not JobStatus.SUCCEEDED:
                logger.info(
                    label,
                    extra={
                        "action": f"job.{label}",
                        "job_id": str(job.id),
                        "type": job.type,
                        "next_status": ended.status.value,
                        "error_code": ended.error_code,
                    },
                )
            self.metrics.observe_attempt(job.type, label, now - held.claimed_at)
            self.held.forget(job.id)
