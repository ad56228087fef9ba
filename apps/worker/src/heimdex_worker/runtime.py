"""The worker process: claim batches from the ledger, run them on threads, write outcomes.

Threads of one process, each with one job:
- `concurrency` runner threads. Each runs claimed jobs from a shared deque while any is ready;
  when none is, it writes the outcomes of what it ran in one statement and claims the next
  batch (a few claims in flight per process, see `_claim_slots`), sleeping until a NOTIFY or
  the poll interval when nothing was due. The claimer runs the first job it claimed, the rest
  wait in the deque for whichever runner is free: no thread is woken per job. A runner claims
  `batch` jobs while jobs are short and one at a time otherwise, when a job's outcome is also
  written as soon as it ends. Writes are retried through an outage: an outcome is never dropped
  while its lease may still be held;
- the keeper renews every lease this process holds in one statement, writes outcomes a runner
  left waiting while it went on to a next job (one statement, one try: a heartbeat never
  waits on an outage or on other runners' outcomes),
  runs the reaper, and every
  `retention_interval_seconds` a slice of the retention pass (one worker of the deployment at a
  time, by advisory lock; a slice stops after a quarter of the heartbeat period, so leases are
  always renewed in time, and the next tick goes on while old jobs are left);
- the listener holds a LISTEN connection and turns notifications into wake-ups (optional: behind
  a transaction pooler, polling alone keeps the worker going).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from prometheus_client import Counter as MetricCounter
from prometheus_client import Histogram
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from heimdex.ledger import repository, retention, service
from heimdex.ledger.errors import CancelRequested, InvalidParams, LeaseLost
from heimdex.ledger.registry import JobError, Registry
from heimdex.ledger.repository import ClaimedJob, Outcome
from heimdex.metrics import LedgerMetrics, RetentionMetrics
from heimdex.models import JobStatus
from heimdex.settings import Settings

logger = logging.getLogger(__name__)

MAX_RETRY_WAIT_SECONDS = 2.0
SHORT_JOB_SECONDS = 0.05


class ShuttingDown(Exception):
    """Raised at a stage boundary when the worker is stopping: the attempt is released."""


@dataclass
class Held:
    """A job this process claimed and has not written the outcome of yet."""

    job: ClaimedJob
    claimed_at: float = field(default_factory=time.monotonic)
    # Set by the keeper when a heartbeat finds the lease gone (a plain flag: an Event per job
    # costs a lock and a condition, and nothing waits on it).
    lost: bool = False
    stage: str | None = None

    @property
    def token(self) -> uuid.UUID:
        token: uuid.UUID = self.job.lease_token
        return token


Done = tuple[Held, "Outcome | service.Failure | None", str]
"""An ended attempt: the job, its outcome (None: the lease was lost) and how it ended."""
Written = tuple[set[uuid.UUID], list[Outcome]]
"""What an outcome write did: the ids of direct outcomes written, the failures' outcomes."""


@dataclass
class _Context:
    worker: Worker
    held: Held

    @property
    def attempt(self) -> int:
        attempt: int = self.held.job.attempt
        return attempt

    def stage(self, name: str, progress: int) -> None:
        if self.held.lost:
            raise LeaseLost(self.held.job.id)
        if self.worker.stopping.is_set():
            raise ShuttingDown

        def record() -> bool | None:
            with self.worker.autocommit() as conn:
                return repository.record_stage(
                    conn, self.held.job.id, self.held.token, stage=name, progress=progress
                )

        # Through an outage the handler waits here; if the lease expired meanwhile, the write
        # finds it gone and the attempt stops (LeaseLost) instead of counting a failure.
        state = _retrying("recording a stage", record, give_up=self.worker.stopping.is_set)
        if state is None:
            raise LeaseLost(self.held.job.id)
        if state:
            raise CancelRequested(self.held.job.id)
        self.held.stage = name


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
        self.reaped = MetricCounter(
            "heimdex_leases_reaped_total",
            "Running jobs whose lease expired and were returned to the queue or dead-lettered",
            registry=self.ledger.registry,
        )
        self._attempt_children: dict[tuple[str, str], Histogram] = {}
        self.retention = RetentionMetrics(self.ledger.registry)
        self.claims = MetricCounter(
            "heimdex_claims_total",
            "Claim statements run by this worker",
            registry=self.ledger.registry,
        )

    def observe_attempt(self, type: str, outcome: str, seconds: float) -> None:
        key = (type, outcome)
        child = self._attempt_children.get(key)
        if child is None:
            child = self._attempt_children[key] = self.attempt_seconds.labels(type, outcome)
        child.observe(seconds)


def _retrying(
    what: str, fn: Callable[[], Any], *, give_up: Callable[[], bool] = lambda: False
) -> Any:
    """Run `fn` until it succeeds; database errors are logged once and retried with backoff."""
    wait = 0.05
    failing = False
    while True:
        try:
            value = fn()
        except DBAPIError as exc:
            if not failing:
                logger.warning(
                    f"{what} failed; retrying",
                    extra={"action": "worker.db_retry", "what": what, "error": type(exc).__name__},
                )
                failing = True
            if give_up():
                raise
            time.sleep(wait)
            wait = min(wait * 2, MAX_RETRY_WAIT_SECONDS)
            continue
        if failing:
            logger.info(f"{what} works again", extra={"action": "worker.db_recovered"})
        return value


class Worker:
    """One worker process's runtime; `run(stop)` blocks until `stop` is set and work drained."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        registry: Registry,
        *,
        worker_id: str,
        concurrency: int,
        batch: int,
        metrics: WorkerMetrics,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.worker_id = worker_id
        self.concurrency = concurrency
        self.batch = batch
        # Runners claim `batch` jobs at a time only while jobs are short (a long job never
        # waits behind another in a busy runner while a thread is free); see _runner.
        self._short_jobs = False
        self._mean_seconds: float | None = None
        self.metrics = metrics
        self.policy = service.RetryPolicy(
            base_seconds=settings.backoff_base_seconds, max_seconds=settings.backoff_max_seconds
        )
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self._held: dict[uuid.UUID, Held] = {}
        self._held_lock = threading.Lock()
        self._local = threading.local()
        # Claimed jobs not started yet, shared by the runners (deque: append and popleft are
        # atomic, and no thread is woken per job).
        self._ready: collections.deque[Held] = collections.deque()
        # Ended attempts waiting for the runner that writes outcomes (see _flush).
        self._outbox: list[Done] = []
        self._outbox_lock = threading.Lock()
        # Each runner's outcomes not handed to the writer yet (see _run), where the keeper can
        # take them from (under _outbox_lock).
        self._parked: list[list[Done]] = []
        self._writing = False
        # Claims in flight at once in this process: one per batch of runners, plus one ahead
        # (batch 1 at concurrency 4: four; batch 10: two). Every idle runner claiming at once
        # would split a batch between them and send more, emptier claims.
        self._claim_slots = threading.BoundedSemaphore(
            min(concurrency, -(-concurrency // batch) + 1)
        )
        self._threads: list[threading.Thread] = []
        self._finish = threading.Event()
        self.archive = (
            retention.JsonlArchive(settings.retention_archive)
            if settings.retention_archive
            else None
        )

    @contextlib.contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """This thread's own connection, each statement its own transaction. Kept for the
        thread's life (no pool checkout per statement); dropped after a database error, so
        the next use connects again."""
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.invalidated:
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._local.conn = conn
        try:
            yield conn
        except DBAPIError:
            self._local.conn = None
            conn.close()
            raise

    # Runner threads: each claims, runs and writes outcomes itself.

    def run(self, stop: threading.Event) -> None:
        self._start_threads()
        while not stop.wait(1.0):
            pass
        self._shutdown()

    def _observe(self, seconds: float) -> None:
        """Keep a moving mean of the handlers' run times (not claim to outcome: that grows
        with the batch and the machine's load); jobs under SHORT_JOB_SECONDS are short."""
        mean = seconds if self._mean_seconds is None else 0.9 * self._mean_seconds + 0.1 * seconds
        self._mean_seconds = mean
        self._short_jobs = mean < SHORT_JOB_SECONDS

    def _pop(self) -> Held | None:
        try:
            return self._ready.popleft()
        except IndexError:
            return None

    def _runner(self) -> None:
        """Run claimed jobs while any is ready; then write their outcomes and claim the next
        batch (sleeping until a NOTIFY or the poll interval when nothing was due)."""
        failing_since: float | None = None
        own: Held | None = None
        pending: list[Done] = []
        with self._outbox_lock:
            self._parked.append(pending)
        while True:
            held, own = own or self._pop(), None
            if held is not None:
                self._run(held, pending)
                continue
            if pending:
                self._flush(self._unpark(pending))
            if self.stopping.is_set():
                return
            # Long jobs: one at a time per runner, so none waits behind another while a
            # thread (here or in another worker) is free.
            want = self.batch if self._short_jobs else 1
            claim: repository.Claim | None = None
            with self._claim_slots:
                if self._ready:
                    continue  # a claim in flight while we waited for the slot brought jobs
                try:
                    claim = self._claim(want)
                except DBAPIError as exc:
                    error = exc
            if claim is None:
                if failing_since is None:
                    failing_since = time.monotonic()
                    logger.warning(
                        "claim failed; retrying",
                        extra={"action": "worker.claim_failed", "error": type(error).__name__},
                    )
                self.stopping.wait(min(self.settings.poll_interval_seconds, MAX_RETRY_WAIT_SECONDS))
                continue
            if failing_since is not None:
                logger.info("claiming again", extra={"action": "worker.claim_recovered"})
                failing_since = None
            if claim.jobs:
                own = self._take(claim.jobs)
            elif not claim.more_due:
                self.wake.wait(self.settings.poll_interval_seconds)
                self.wake.clear()

    def _run(self, held: Held, pending: list[Done]) -> None:
        """One attempt; its outcome is parked in the runner's `pending`. Short jobs: written
        together once the runner finds nothing ready (`_runner`), or taken by the keeper at its
        next tick, so none waits for a long job this runner happens to start next. Long jobs:
        written at once, so none waits for the next job to end. (Handing each outcome to the
        shared outbox at once instead let the writer drain it in pieces, a statement per one or
        two outcomes, and so did writing as soon as the deque was empty rather than after one
        more look: PostgreSQL's CPU per job went up by a third at batch 10.)"""
        started = time.monotonic()
        done = self._attempt(held)
        self._observe(time.monotonic() - started)
        with self._outbox_lock:
            pending.append(done)
        if self._ready and not self._short_jobs:
            self._flush(self._unpark(pending))

    def _unpark(self, pending: list[Done]) -> list[Done]:
        """What is parked in one runner's `pending`, taken out of it."""
        with self._outbox_lock:
            taken = list(pending)
            pending.clear()
        return taken

    def _unpark_all(self) -> list[Done]:
        with self._outbox_lock:
            taken = [done for pending in self._parked for done in pending]
            for pending in self._parked:
                pending.clear()
        return taken

    def _take(self, jobs: list[ClaimedJob]) -> Held:
        """Hold what was claimed; the first job is the claimer's own (so its next write
        carries an outcome), the rest go to the shared deque for whichever runner is free."""
        with self._held_lock:
            fresh = [Held(job) for job in jobs]
            for h in fresh:
                self._held[h.job.id] = h
        self._ready.extend(fresh[1:])
        for type_, n in Counter(job.type for job in jobs).items():
            self.metrics.ledger.count(type_, JobStatus.QUEUED, JobStatus.RUNNING, n)
        if len(jobs) > 1:
            self.wake.set()  # idle runners help with the batch
        return fresh[0]

    def _flush(self, ended: list[Done], *, keeper: bool = False) -> None:
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
                with self.autocommit() as conn:
                    return repository.write_outcomes(conn, direct), []
            with self.engine.begin() as conn:
                written = repository.write_outcomes(conn, direct)
                return written, service.fail_attempts(conn, failures, policy=self.policy)

        result: Written = _retrying("writing outcomes", write, give_up=lambda: not retry)
        return result

    def _claim(self, limit: int) -> repository.Claim:
        with self.autocommit() as conn:
            claim = repository.claim(
                conn, worker_id=self.worker_id, limit=limit,
                lease_seconds=self.settings.lease_seconds,
            )  # fmt: skip
        self.metrics.claims.inc()
        return claim

    def _attempt(self, held: Held) -> Done:  # noqa: PLR0911 - one return per way an attempt ends
        job = held.job
        if self.stopping.is_set():
            return held, service.released(job), "released"
        try:
            job_type = self.registry.get(job.type)
            assert job_type.handler is not None  # the worker refuses to start otherwise
            params = job_type.parse(job.params)
            result = job_type.handler(_Context(self, held), params)
        except CancelRequested:
            return held, service.canceled(job, stage=held.stage), "canceled"
        except ShuttingDown:
            return held, service.released(job), "released"
        except LeaseLost:
            return held, None, "lease_lost"
        except InvalidParams as exc:
            return held, self._failure(job, "INVALID_PARAMS", str(exc), retryable=False), "failed"
        except JobError as exc:
            return held, self._failure(job, exc.code, str(exc), retryable=exc.retryable), "failed"
        except Exception as exc:  # a handler's bug: recorded with its traceback, then retried
            message = "".join(traceback.format_exception(exc)).strip()
            return held, self._failure(job, type(exc).__name__, message, retryable=True), "failed"
        if held.lost:
            return held, None, "lease_lost"
        return held, service.succeeded(job, result), "succeeded"

    @staticmethod
    def _failure(job: ClaimedJob, code: str, message: str, *, retryable: bool) -> service.Failure:
        return service.Failure(job.id, job.lease_token, code, message, retryable)

    def _settle(self, batch: list[Done], written_and_failed: Written) -> None:
        """Count, log and forget the attempts whose outcomes were just written."""
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
            else:
                self.metrics.ledger.count(job.type, JobStatus.RUNNING, ended.status)
                if ended.status is not JobStatus.SUCCEEDED:
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
            with self._held_lock:
                self._held.pop(job.id, None)

    # The keeper: heartbeat and reaper.

    def _keeper(self) -> None:
        next_reap = 0.0
        next_prune = 0.0
        while not self._finish.wait(self.settings.heartbeat_seconds / 2):
            now = time.monotonic()
            with self._held_lock:
                held = list(self._held.values())
            due = [h for h in held if now - h.claimed_at >= self.settings.heartbeat_seconds / 2]
            if due:
                try:
                    with self.autocommit() as conn:
                        kept = repository.renew_leases(
                            conn, [h.token for h in due], lease_seconds=self.settings.lease_seconds
                        )
                except DBAPIError as exc:
                    logger.warning(
                        "heartbeat failed",
                        extra={"action": "worker.heartbeat_failed", "error": type(exc).__name__},
                    )
                else:
                    for h in due:
                        if h.token not in kept:
                            h.lost = True
            parked = self._unpark_all()  # outcomes of runners now busy with a next job
            if parked or self._outbox:
                self._flush(parked, keeper=True)
            if now >= next_reap:
                next_reap = now + self.settings.reaper_interval_seconds
                self._reap()
            if now >= next_prune:
                done = self._prune()
                # Old jobs left: the next tick goes on; else the next pass is an interval away.
                next_prune = time.monotonic() + (
                    self.settings.retention_interval_seconds if done else 0.0
                )

    def _prune(self) -> bool:
        """A slice of the retention pass; True when nothing old is left (or another worker
        prunes), False when the next tick should go on."""
        try:
            result = retention.prune(
                self.engine,
                self.settings.retention_policy,
                batch_size=self.settings.retention_batch,
                archive=self.archive,
                observer=self.metrics.retention,
                budget_seconds=self.settings.heartbeat_seconds / 4,
                pause_factor=self.settings.retention_pause_factor,
                stop=self._finish.is_set,
            )
        except Exception as exc:
            logger.warning(
                "retention pass failed",
                extra={"action": "retention.failed", "error": f"{type(exc).__name__}: {exc}"},
            )
            return True
        return result.complete

    def _reap(self) -> None:
        try:
            with self.engine.begin() as conn:
                reaped = service.reap_expired_leases(
                    conn, policy=self.policy, stale_after_seconds=self.settings.lease_seconds
                )
        except DBAPIError as exc:
            logger.warning(
                "reaper pass failed",
                extra={"action": "reaper.failed", "error": type(exc).__name__},
            )
            return
        for outcome in reaped:
            logger.warning(
                "lease expired",
                extra={
                    "action": "reaper.requeued",
                    "job_id": str(outcome.job_id),
                    "next_status": outcome.status.value,
                    "attempt": outcome.attempt,
                },
            )
        self.metrics.reaped.inc(len(reaped))
        if reaped:
            self.wake.set()

    # The listener.

    def _listener(self) -> None:
        url = self.engine.url.set(drivername="postgresql")
        conninfo = url.render_as_string(hide_password=False)
        wait = 0.1
        while not self._finish.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {repository.NOTIFY_CHANNEL}")
                    # Anything sent while we were not listening: look once.
                    self.wake.set()
                    wait = 0.1
                    while not self._finish.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self.wake.set()
            except psycopg.Error as exc:
                logger.info(
                    "listener disconnected; polling until it reconnects",
                    extra={"action": "worker.listen_lost", "error": type(exc).__name__},
                )
                self._finish.wait(wait)
                wait = min(wait * 2, MAX_RETRY_WAIT_SECONDS)

    # Start and stop.

    def _start_threads(self) -> None:
        targets: list[tuple[str, Callable[[], None]]] = [
            (f"runner-{i}", self._runner) for i in range(self.concurrency)
        ]
        targets.append(("keeper", self._keeper))
        if self.settings.listen:
            targets.append(("listener", self._listener))
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _shutdown(self) -> None:
        """Stop claiming; release what has not started and what reaches a stage boundary, wait
        up to the grace for the rest; a job still running after it keeps its lease until it
        expires, then the reaper requeues it."""
        self.stopping.set()
        self.wake.set()
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds
        while time.monotonic() < deadline:
            with self._held_lock:
                if not self._held:
                    break
            parked = self._unpark_all()  # or left by a keeper's failed write
            if parked or self._outbox:
                self._flush(parked, keeper=True)
            time.sleep(0.05)
        self._finish.set()
        for thread in self._threads:
            # Runners are done once nothing is held (or stuck in a handler past the grace).
            thread.join(timeout=5 if thread.name == "keeper" else 0.5)
        if self.archive is not None:
            self.archive.close()
        with self._held_lock:
            left = len(self._held)
        if left:
            logger.warning(
                "stopped with attempts still running; their leases will expire",
                extra={"action": "worker.abandoned", "count": left},
            )
