"""The keeper thread: renews every lease the process holds in one statement, writes outcomes a
runner left parked while it went on to a next job, runs the reaper, and every
`retention_interval_seconds` a slice of the retention pass. With each reaper pass it fires the
due periodic schedules (ledger/schedules.py: every worker does, a fire time is one job). Twice
a second it records the jobs waiting unstarted in the runners' deque (`record_prefetched`)."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from heimdex.ledger import control, repository, retention, schedules, service
from heimdex.ledger.registry import Registry
from heimdex.settings import Settings
from heimdex_worker.db import Lane, failure_fields
from heimdex_worker.held import HeldJobs
from heimdex_worker.metrics import WorkerMetrics
from heimdex_worker.outcomes import OutcomeWriter

logger = logging.getLogger(__name__)

# A claimed job no runner took for this long is recorded as not started (record_prefetched).
PREFETCH_GRACE_SECONDS = 1.0


class Keeper:
    """Heartbeat, parked outcomes, reaper and retention, until `finish` is set."""

    def __init__(
        self,
        settings: Settings,
        lane: Lane,
        held: HeldJobs,
        writer: OutcomeWriter,
        *,
        policy: service.RetryPolicy,
        metrics: WorkerMetrics,
        archive: retention.Archive | None,
        finish: threading.Event,
        wake: threading.Event,
        retention_engine: Engine | None,
        registry: Registry,
    ) -> None:
        self.settings = settings
        # The keeper's own connection: a heartbeat never waits behind claims or outcomes.
        self.lane = lane
        # Retention holds a session advisory lock: None behind a transaction pooler without a
        # session URL, and then the keeper does not prune.
        self.retention_engine = retention_engine
        self.held = held
        self.writer = writer
        self.policy = policy
        self.metrics = metrics
        self.archive = archive
        self.finish = finish
        self.wake = wake
        self.registry = registry
        self.declared = schedules.declared_schedules(registry)
        self.declared_synced = not self.declared

    def run(self) -> None:
        next_reap = 0.0
        next_prune = 0.0
        next_recount = time.monotonic() + self.settings.limits_reconcile_seconds
        if self.retention_engine is None and self.settings.retention_policy.deletes_anything:
            logger.warning(
                "behind a transaction pooler without HEIMDEX_SESSION_DATABASE_URL: retention"
                " needs a session for its lock and does not run in this worker; run"
                " `heimdex jobs prune --database-url` over a session connection",
                extra={"action": "retention.no_session"},
            )
        tick = self.settings.heartbeat_seconds / 2
        next_tick = time.monotonic() + tick
        while not self.finish.wait(min(PREFETCH_GRACE_SECONDS / 2, tick)):
            self.record_prefetched()
            now = time.monotonic()
            if now < next_tick:
                continue
            next_tick = now + tick
            held = self.held.all()
            due = [h for h in held if now - h.claimed_at >= self.settings.heartbeat_seconds / 2]
            if due:
                try:
                    with self.lane.autocommit() as conn:
                        kept = repository.renew_leases(
                            conn, [h.token for h in due], lease_seconds=self.settings.lease_seconds
                        )
                except DBAPIError as exc:
                    logger.warning(
                        "heartbeat failed",
                        extra={"action": "worker.heartbeat_failed", **failure_fields(exc)},
                    )
                else:
                    for h in due:
                        if h.token not in kept:
                            h.lost = True
            parked = self.writer.unpark_all()  # outcomes of runners now busy with a next job
            if parked or self.writer.waiting:
                self.writer.flush(parked, keeper=True)
            if now >= next_reap:
                next_reap = now + self.settings.reaper_interval_seconds
                self.reap()
                self.fire_schedules()
            if now >= next_recount:
                next_recount = now + self.settings.limits_reconcile_seconds
                self.recount_limits()
            if now >= next_prune and self.retention_engine is not None:
                done = self.prune(self.retention_engine)
                # Old jobs left: the next tick goes on; else the next pass is an interval away.
                next_prune = time.monotonic() + (
                    self.settings.retention_interval_seconds if done else 0.0
                )

    def record_prefetched(self) -> None:
        """Record the jobs waiting in the deque for PREFETCH_GRACE_SECONDS or more as not
        started, in one statement: if this process is lost now, the reaper returns them to the
        queue uncharged. A runner that takes one records its start first, never while this
        statement is in flight (`HeldJobs.take`): the ledger never says "not started" of a job
        whose handler runs. Short jobs leave the deque long before."""
        if not self.held.recording.acquire(blocking=False):
            return
        try:
            waiting = self.held.mark_prefetched(PREFETCH_GRACE_SECONDS)
            if not waiting:
                return
            try:
                with self.lane.autocommit() as conn:
                    repository.record_prefetched(conn, [(h.job.id, h.token) for h in waiting])
            except DBAPIError as exc:
                logger.warning(
                    "recording prefetched jobs failed",
                    extra={"action": "worker.prefetch_failed", **failure_fields(exc)},
                )
                self.held.unmark(waiting)  # counted as started meanwhile; next time again
        finally:
            self.held.recording.release()

    def prune(self, engine: Engine) -> bool:
        """A slice of the retention pass; True when nothing old is left (or another worker
        prunes), False when the next tick should go on."""
        try:
            result = retention.prune(
                engine,
                self.settings.retention_policy,
                batch_size=self.settings.retention_batch,
                archive=self.archive,
                observer=self.metrics.retention,
                budget_seconds=self.settings.heartbeat_seconds / 4,
                pause_factor=self.settings.retention_pause_factor,
                stop=self.finish.is_set,
            )
        except Exception as exc:
            logger.warning(
                "retention pass failed",
                extra={"action": "retention.failed", "error": f"{type(exc).__name__}: {exc}"},
            )
            return True
        return result.complete

    def recount_limits(self) -> None:
        """Recount the caps' slots from the job rows (ledger/control.py): a count left wrong
        heals, and held jobs a scope has room for are looked at again."""
        try:
            with self.lane.transaction() as conn:
                control.lock_placer(conn)
                changed = control.reconcile(conn)
        except DBAPIError as exc:
            logger.warning(
                "recounting the caps failed",
                extra={"action": "limits.recount_failed", **failure_fields(exc)},
            )
            return
        if changed:
            logger.info("caps recounted", extra={"action": "limits.recounted", "changed": changed})
            self.wake.set()

    def fire_schedules(self) -> None:
        """Keep the declared schedules' rows in step (once), then fire the due schedules."""
        try:
            if not self.declared_synced:
                with self.lane.transaction() as conn:
                    schedules.sync_declared(conn, self.declared)
                self.declared_synced = True
            with self.lane.transaction() as conn:
                fired = schedules.fire_due(conn, self.registry)
        except DBAPIError as exc:
            logger.warning(
                "firing schedules failed",
                extra={"action": "schedule.failed", **failure_fields(exc)},
            )
            return
        for f in fired:
            logger.info(
                "schedule fired",
                extra={
                    "action": "schedule.fired",
                    "org_id": str(f.org_id),
                    "schedule": f.name,
                    "fire_at": f.fire_at.isoformat(),
                    "job_id": str(f.job_id) if f.job_id else None,
                    "job_created": f.created,
                },
            )
        if any(f.created for f in fired):
            self.wake.set()

    def reap(self) -> None:
        try:
            with self.lane.transaction() as conn:
                reaped = service.reap_expired_leases(
                    conn, policy=self.policy, stale_after_seconds=self.settings.lease_seconds
                )
        except DBAPIError as exc:
            logger.warning(
                "reaper pass failed",
                extra={"action": "reaper.failed", **failure_fields(exc)},
            )
            return
        for outcome in reaped:
            logger.warning(
                "lease expired",
                extra={
                    "action": "reaper.requeued",
                    "job_id": str(outcome.job_id),
                    "event": outcome.detail.get("action"),
                    "next_status": outcome.status.value,
                    "attempt": outcome.attempt,
                },
            )
        self.metrics.reaped.inc(len(reaped))
        if reaped:
            self.wake.set()
