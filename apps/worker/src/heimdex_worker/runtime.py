"""The worker process: claim batches from the ledger, run them on threads, write outcomes.

Threads of one process, each with one job; this module wires them:
- `concurrency` runner threads. Each runs claimed jobs from a shared deque while any is ready;
  when none is, it writes the outcomes of what it ran in one statement and claims the next
  batch (a few claims in flight per process, see `_claim_slots`), sleeping until a NOTIFY or
  the poll interval when nothing was due. The claimer runs the first job it claimed, the rest
  wait in the deque for whichever runner is free: no thread is woken per job. A runner claims
  `batch` jobs while jobs are short and one at a time otherwise, when a job's outcome is also
  written as soon as it ends. When a claim says due jobs wait to be placed, its runner places
  a batch (`_place`) and claims again. Writes are retried through an outage: an outcome is
  never dropped while its lease may still be held (`outcomes.py`, one writer at a time);
- the keeper (`keeper.py`) renews every lease this process holds in one statement, writes
  outcomes a runner left waiting while it went on to a next job (one statement, one try: a
  heartbeat never waits on an outage or on other runners' outcomes), runs the reaper, and every
  `retention_interval_seconds` a slice of the retention pass (one worker of the deployment at a
  time, by advisory lock; a slice stops after a quarter of the heartbeat period, so leases are
  always renewed in time, and the next tick goes on while old jobs are left);
- the listener (`listener.py`) holds a LISTEN connection and turns notifications into wake-ups.
A slot is a thread, not a connection: the threads share a few lanes of connections (`db.Lanes`,
sized by `HEIMDEX_WORKER_DB_CONNECTIONS` whatever the concurrency), each thread taking one for a
statement: the claims', the outcome writer's, the keeper's, the attempts' own writes (a start,
stages, checkpoints) and the handlers' (`ctx.connect()`), so a handler waiting for a connection
never holds up a claim.
LISTEN and retention's lock need a session: behind a transaction pooler they use
`HEIMDEX_SESSION_DATABASE_URL`, and without it the worker polls and does not prune.
"""

from __future__ import annotations

import collections
import json
import logging
import signal
import subprocess
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from heimdex.ledger import repository, retention, service
from heimdex.ledger.errors import CancelRequested, InvalidParams, LeaseLost
from heimdex.ledger.registry import JobError, JobTimeout, PermanentJobError, Registry
from heimdex.ledger.repository import ClaimedJob
from heimdex.models import DEFAULT_QUEUE, STAGE_MAX
from heimdex.settings import Settings
from heimdex_worker.db import (
    MAX_RETRY_WAIT_SECONDS,
    Budget,
    Lanes,
    failure_fields,
    retrying,
)
from heimdex_worker.deadlines import DeadlineWatch, signal_group
from heimdex_worker.held import Done, Held, HeldJobs
from heimdex_worker.keeper import Keeper
from heimdex_worker.listener import listen
from heimdex_worker.metrics import WorkerMetrics
from heimdex_worker.outcomes import OutcomeWriter

logger = logging.getLogger(__name__)

SHORT_JOB_SECONDS = 0.05


class ShuttingDown(Exception):
    """Raised at a stage boundary when the worker is stopping: the attempt is released."""


CHECKPOINT_MAX_BYTES = 64 * 1024
EXIT_ALL_STUCK = 3


class _Context:
    """The `JobContext` of one attempt."""

    def __init__(self, worker: Worker, held: Held) -> None:
        self.worker = worker
        self.held = held
        saved = held.job.checkpoint
        self._resumed = saved is not None
        self._state: dict[str, Any] = dict((saved or {}).get("state") or {})
        self._checkpoint_stage: str | None = (saved or {}).get("stage")

    @property
    def job_id(self) -> uuid.UUID:
        job_id: uuid.UUID = self.held.job.id
        return job_id

    @property
    def attempt(self) -> int:
        attempt: int = self.held.job.attempt
        return attempt

    @property
    def resumed(self) -> bool:
        return self._resumed

    @property
    def state(self) -> dict[str, Any]:
        return self._state

    @property
    def checkpoint_stage(self) -> str | None:
        return self._checkpoint_stage

    def check(self) -> None:
        if self.held.lost:
            raise LeaseLost(self.held.job.id)
        if self.held.timed_out:
            raise JobTimeout(self._timeout_message())
        if self.worker.stopping.is_set():
            raise ShuttingDown

    def stage(self, name: str, progress: int) -> None:
        self.check()
        self._record(name, progress, None)

    def checkpoint(self, name: str, progress: int, state: Mapping[str, Any]) -> None:
        try:
            size = len(json.dumps(state, separators=(",", ":")).encode())
        except (TypeError, ValueError) as exc:
            raise PermanentJobError("CHECKPOINT_INVALID", f"a checkpoint is JSON: {exc}") from None
        if size > CHECKPOINT_MAX_BYTES:
            raise PermanentJobError(
                "CHECKPOINT_TOO_LARGE",
                f"a checkpoint's state is {size} bytes of JSON; the limit is "
                f"{CHECKPOINT_MAX_BYTES} (keep large data elsewhere and save its key)",
            )
        if self.held.lost:
            raise LeaseLost(self.held.job.id)
        # The stage's work is done: saved even when the attempt must stop (timeout, shutdown),
        # so the next attempt does not do it again.
        self._record(name, progress, state)
        self._state = dict(state)
        self._checkpoint_stage = name[:STAGE_MAX]
        self.check()

    def _record(self, name: str, progress: int, state: Mapping[str, Any] | None) -> None:
        def record() -> bool | None:
            with self.worker.lanes.attempts.autocommit() as conn:
                return repository.record_stage(
                    conn, self.held.job.id, self.held.token, stage=name, progress=progress,
                    checkpoint=state,
                )  # fmt: skip

        # Through an outage the handler waits here; if the lease expired meanwhile, the write
        # finds it gone and the attempt stops (LeaseLost) instead of counting a failure.
        recorded = retrying("recording a stage", record, give_up=self.worker.stopping.is_set)
        if recorded is None:
            raise LeaseLost(self.held.job.id)
        if recorded:
            raise CancelRequested(self.held.job.id)
        self.held.stage = name

    def connect(self) -> AbstractContextManager[Connection]:
        return self.worker.lanes.handlers.session()

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        if kwargs.pop("start_new_session", True) is not True:
            raise ValueError("a child of the context runs in a session of its own")
        self.check()
        proc: subprocess.Popen[Any] = subprocess.Popen(args, start_new_session=True, **kwargs)
        self.held.children.append(proc)
        if self.held.timed_out:  # the deadline passed while it started
            signal_group(proc, signal.SIGTERM)
        return proc

    def run_process(
        self, args: Sequence[str], *, check: bool = True, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        stdin = kwargs.pop("input", None)
        with self.popen(args, **kwargs) as proc:
            stdout, stderr = proc.communicate(stdin)
        if self.held.timed_out:
            raise JobTimeout(f"{self._timeout_message()}; {args[0]} was stopped")
        if self.held.lost:
            raise LeaseLost(self.held.job.id)
        if check and proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, list(args), stdout, stderr)
        return subprocess.CompletedProcess(list(args), proc.returncode, stdout, stderr)

    def _timeout_message(self) -> str:
        return f"the attempt passed its execution timeout of {self.worker.timeout_of(self.held)} s"


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
        session_engine: Engine | None,
        queues: Sequence[str] | None = None,
    ) -> None:
        """`session_engine` reaches a session (LISTEN, retention's advisory lock): `engine`
        itself unless it is a transaction pooler's; None behind one without
        `HEIMDEX_SESSION_DATABASE_URL` (the worker then polls and does not prune)."""
        self.settings = settings
        self.engine = engine
        self.session_engine = session_engine
        self.registry = registry
        self.worker_id = worker_id
        self.concurrency = concurrency
        self.batch = batch
        # The queues this worker claims (`--queues`); by default every queue of its types.
        self.queues = tuple(queues or registry.queues() or (DEFAULT_QUEUE,))
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
        self.budget = Budget.of(
            settings.worker_db_connections, concurrency=concurrency, batch=batch
        )
        self.lanes = Lanes(engine, self.budget)
        self.held = HeldJobs()
        # Claimed jobs not started yet, shared by the runners (deque: append and popleft are
        # atomic, and no thread is woken per job).
        self._ready: collections.deque[Held] = collections.deque()
        self.writer = OutcomeWriter(
            self.lanes.outcomes, self.held, policy=self.policy, metrics=metrics
        )
        # Claims in flight at once in this process (`Budget.claims`), each on a connection of
        # the claims' own lane: a claim never waits behind an attempt's write.
        self._claim_slots = threading.BoundedSemaphore(self.budget.claims)
        # One runner of this process places due jobs at a time (`_place`); the placing
        # statement lets one placer of the deployment work at a time.
        self._placing = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._finish = threading.Event()
        self.archive = (
            retention.JsonlArchive(settings.retention_archive)
            if settings.retention_archive
            else None
        )
        self.keeper = Keeper(
            settings,
            self.lanes.keeper,
            self.held,
            self.writer,
            policy=self.policy,
            metrics=metrics,
            archive=self.archive,
            finish=self._finish,
            wake=self.wake,
            retention_engine=session_engine,
            registry=registry,
        )
        self.deadlines = DeadlineWatch(
            self.held,
            grace_seconds=settings.timeout_grace_seconds,
            on_stuck=self._stuck,
            finish=self._finish,
        )
        # Handlers that did not stop at their deadline and still hold a thread: each one's slot
        # went to a fresh runner. When they are as many as the slots, the process exits
        # non-zero (EXIT_ALL_STUCK) for its supervisor to restart it.
        self._stuck_threads = 0
        self._stuck_lock = threading.Lock()
        self._all_stuck = threading.Event()
        self._runners = 0

    def timeout_of(self, held: Held) -> int | None:
        """The execution timeout of `held`'s attempt, seconds (None: unbounded)."""
        return self.registry.get(held.job.type).timeout_for(held.job.timeout_seconds)

    # Runner threads: each claims, runs and writes outcomes itself.

    def run(self, stop: threading.Event) -> int:
        """Run until `stop`; the process's exit code: 0, or EXIT_ALL_STUCK when every slot's
        handler was stuck past its deadline (the stop then is the worker's own)."""
        self._start_threads()
        while not stop.wait(1.0):
            if self._all_stuck.is_set():
                logger.error(
                    "every slot's handler is stuck past its deadline; stopping",
                    extra={"action": "worker.all_stuck", "stuck": self._stuck_threads},
                )
                break
        self._shutdown()
        return EXIT_ALL_STUCK if self._all_stuck.is_set() else 0

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

    def _runner(self) -> None:  # noqa: PLR0912 - one loop: run, write, claim, place, wait
        """Run claimed jobs while any is ready; then write their outcomes and claim the next
        batch (sleeping until a NOTIFY or the poll interval when nothing was due)."""
        failing_since: float | None = None
        own: Held | None = None
        pending = self.writer.parking()
        while True:
            held, own = own or self._pop(), None
            if held is not None:
                if not self._run(held, pending):
                    # Its handler was stuck, and a fresh runner took this slot meanwhile.
                    self.writer.flush(self.writer.unpark(pending))
                    return
                continue
            if pending:
                self.writer.flush(self.writer.unpark(pending))
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
                        extra={"action": "worker.claim_failed", **failure_fields(error)},
                    )
                self.stopping.wait(min(self.settings.poll_interval_seconds, MAX_RETRY_WAIT_SECONDS))
                continue
            if failing_since is not None:
                logger.info("claiming again", extra={"action": "worker.claim_recovered"})
                failing_since = None
            if claim.jobs:
                own = self._take(claim.jobs)
            if claim.more_due and self._place():
                continue  # what it placed is claimable now
            if not claim.jobs:
                self.wake.wait(self.settings.poll_interval_seconds)
                self.wake.clear()

    def _run(self, held: Held, pending: list[Done]) -> bool:
        """One attempt; its outcome is parked in the runner's `pending`. Short jobs: written
        together once the runner finds nothing ready (`_runner`), or taken by the keeper at its
        next tick, so none waits for a long job this runner happens to start next. Long jobs:
        written at once, so none waits for the next job to end. (Handing each outcome to the
        shared outbox at once instead let the writer drain it in pieces, a statement per one or
        two outcomes, and so did writing as soon as the deque was empty rather than after one
        more look: PostgreSQL's CPU per job went up by a third at batch 10.) False when the
        attempt was declared stuck meanwhile: its late outcome is void (the lease went with the
        TIMEOUT already written) and this runner's slot is taken."""
        started = time.monotonic()
        done = self._attempt(held)
        if not held.end("runner"):
            with self._stuck_lock:
                self._stuck_threads -= 1
                self.metrics.stuck.set(self._stuck_threads)
            logger.warning(
                "a stuck handler returned; its outcome is void",
                extra={"action": "worker.stuck_returned", "job_id": str(held.job.id)},
            )
            return False
        self._observe(time.monotonic() - started)
        self.writer.park(pending, done)
        if self._ready and not self._short_jobs:
            self.writer.flush(self.writer.unpark(pending))
        return True

    def _take(self, jobs: list[ClaimedJob]) -> Held:
        """Hold what was claimed; the first job is the claimer's own (so its next write
        carries an outcome), the rest go to the shared deque for whichever runner is free."""
        fresh = self.held.hold(jobs)
        self._ready.extend(fresh[1:])
        if len(jobs) > 1:
            self.wake.set()  # idle runners help with the batch
        return fresh[0]

    def _claim(self, limit: int) -> repository.Claim:
        with self.lanes.claims.autocommit() as conn:
            claim = service.claim(
                conn, worker_id=self.worker_id, limit=limit,
                lease_seconds=self.settings.lease_seconds, queues=self.queues,
            )  # fmt: skip
        self.metrics.claims.inc()
        return claim

    def _place(self) -> bool:
        """Place the next batch of due jobs that wait unplaced (`repository.place_due`), one
        runner of this process at a time; True when it placed some. A runner finding another
        placer at work goes on: that one's wake-up (here) or NOTIFY (elsewhere) follows."""
        if not self._placing.acquire(blocking=False):
            return False
        try:
            with self.lanes.attempts.autocommit() as conn:
                placed = repository.place_due(conn)
        except DBAPIError as exc:
            logger.warning(
                "placing failed",
                extra={"action": "worker.place_failed", **failure_fields(exc)},
            )
            return False
        finally:
            self._placing.release()
        if not placed:
            return False
        self.metrics.placed.inc(placed)
        self.wake.set()  # idle runners claim what was placed
        return True

    def _attempt(self, held: Held) -> Done:  # noqa: PLR0911 - one return per way an attempt ends
        job = held.job
        start_first = self.held.take(held)
        if self.stopping.is_set():
            return held, service.released(job), "released"
        if start_first:
            try:
                if not self._record_start(held):
                    return held, None, "lease_lost"
            except DBAPIError:  # stopping through an outage: it never started
                return held, service.released(job), "released"
        try:
            job_type = self.registry.get(job.type)
            assert job_type.handler is not None  # the worker refuses to start otherwise
            params = job_type.parse(job.params)
            context = _Context(self, held)
            if job.checkpoint is not None:
                self._resume(held)
            timeout = job_type.timeout_for(job.timeout_seconds)
            if timeout is not None:
                self.deadlines.watch(held, timeout)
            result = job_type.handler(context, params)
        except CancelRequested:
            return held, service.canceled(job, stage=held.stage), "canceled"
        except ShuttingDown:
            return held, service.released(job), "released"
        except LeaseLost:
            return held, None, "lease_lost"
        except Exception as exc:
            return self._failed(held, exc)
        if held.lost:
            return held, None, "lease_lost"
        return held, service.succeeded(job, result), "succeeded"

    def _failed(self, held: Held, exc: Exception) -> Done:
        job = held.job
        if held.timed_out:  # whatever the handler raised once told to stop
            message = f"the attempt passed its execution timeout of {self.timeout_of(held)} s"
            return held, self._failure(job, "TIMEOUT", message, retryable=True), "timeout"
        if isinstance(exc, InvalidParams):
            failure = self._failure(job, "INVALID_PARAMS", str(exc), retryable=False)
        elif isinstance(exc, JobError):
            failure = self._failure(job, exc.code, str(exc), retryable=exc.retryable)
        else:  # a handler's bug: recorded with its traceback, then retried
            message = "".join(traceback.format_exception(exc)).strip()
            failure = self._failure(job, type(exc).__name__, message, retryable=True)
        return held, failure, "failed"

    def _resume(self, held: Held) -> None:
        """The event of an attempt that starts from its job's checkpoint: what it skips."""
        saved = held.job.checkpoint or {}
        detail = {
            "action": "resumed",
            "attempt": held.job.attempt,
            "skipped_through": saved.get("stage"),
            "progress": saved.get("progress"),
        }

        def record() -> bool:
            with self.lanes.attempts.autocommit() as conn:
                return repository.record_resumed(conn, held.job.id, held.token, detail)

        if not retrying("recording a resume", record, give_up=self.stopping.is_set):
            raise LeaseLost(held.job.id)

    def _stuck(self, held: Held) -> None:
        """The handler did not stop within the grace period after its deadline: end the attempt
        (TIMEOUT, retried by the job's policy; its lease goes with it, so whatever the handler
        does later is void) and give its slot to a fresh runner."""
        held.lost = True  # its next stage or check raises
        job = held.job
        with self._stuck_lock:
            self._stuck_threads += 1
            stuck = self._stuck_threads
            self.metrics.stuck.set(stuck)
        self.metrics.stuck_total.labels(job.type).inc()
        logger.error(
            "handler stuck past its deadline; attempt ended, slot given back",
            extra={"action": "worker.stuck", "job_id": str(job.id), "type": job.type},
        )
        message = (
            f"the attempt passed its execution timeout of {self.timeout_of(held)} s and the "
            f"handler did not stop within {self.settings.timeout_grace_seconds:g} s (stuck)"
        )
        failure = service.Failure(
            job.id, job.lease_token, "TIMEOUT", message, True, detail={"stuck": True}
        )
        self.writer.flush([(held, failure, "stuck")], keeper=True)
        if stuck >= self.concurrency:
            self._all_stuck.set()
        elif not self.stopping.is_set():
            self._start_runner()

    def _record_start(self, held: Held) -> bool:
        """Record that a job the keeper recorded as waiting unstarted starts now, before its
        handler runs, so that a worker lost from here on charges the attempt (see
        docs/architecture.md, what counts as an attempt); False when the lease is gone.
        Retried through an outage until the worker stops."""

        def record() -> bool:
            with self.lanes.attempts.autocommit() as conn:
                return repository.record_start(conn, held.job.id, held.token)

        started: bool = retrying("recording a start", record, give_up=self.stopping.is_set)
        return started

    @staticmethod
    def _failure(job: ClaimedJob, code: str, message: str, *, retryable: bool) -> service.Failure:
        return service.Failure(job.id, job.lease_token, code, message, retryable)

    def _listen(self) -> None:
        assert self.session_engine is not None
        listen(self.session_engine.url, finish=self._finish, wake=self.wake)

    # Start and stop.

    def _start_threads(self) -> None:
        for _ in range(self.concurrency):
            self._start_runner()
        targets: list[tuple[str, Callable[[], None]]] = [
            ("keeper", self.keeper.run),
            ("deadlines", self.deadlines.run),
        ]
        if self.settings.listen and self.session_engine is None:
            logger.warning(
                "behind a transaction pooler without HEIMDEX_SESSION_DATABASE_URL: no LISTEN,"
                " polling every %ss",
                self.settings.poll_interval_seconds,
                extra={"action": "worker.polling"},
            )
        elif self.settings.listen:
            targets.append(("listener", self._listen))
        for name, target in targets:
            self._start(name, target)

    def _start_runner(self) -> None:
        self._start(f"runner-{self._runners}", self._runner)
        self._runners += 1

    def _start(self, name: str, target: Callable[[], None]) -> None:
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
            if not self.held:
                break
            parked = self.writer.unpark_all()  # or left by a keeper's failed write
            if parked or self.writer.waiting:
                self.writer.flush(parked, keeper=True)
            time.sleep(0.05)
        self._finish.set()
        for thread in self._threads:
            # Runners are done once nothing is held (or stuck in a handler past the grace).
            thread.join(timeout=5 if thread.name == "keeper" else 0.5)
        self.lanes.close()
        if self.archive is not None:
            self.archive.close()
        left = len(self.held)
        if left:
            logger.warning(
                "stopped with attempts still running; their leases will expire",
                extra={"action": "worker.abandoned", "count": left},
            )
