"""One attempt of one job: claim, heartbeat, run the handler, record the outcome."""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from heimdex_common.db import unit_of_work
from heimdex_common.ledger import service
from heimdex_common.ledger.errors import CancelRequested, LeaseLost
from heimdex_common.models import Job, JobStatus
from heimdex_common.settings import Settings
from heimdex_worker.handlers import HANDLERS, Handler, JobError, PermanentJobError
from heimdex_worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)


class ShuttingDown(Exception):
    """Raised at a stage boundary when the worker is stopping: the attempt is released."""


class Heartbeat:
    """Renews the lease every `interval` seconds until stopped; flags a lost lease."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        job_id: uuid.UUID,
        token: uuid.UUID,
        *,
        interval: float,
        lease_seconds: float,
    ) -> None:
        self._factory = factory
        self._job_id = job_id
        self._token = token
        self._interval = interval
        self._lease_seconds = lease_seconds
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                with unit_of_work(self._factory) as session:
                    held = service.renew_lease(
                        session, self._job_id, self._token, lease_seconds=self._lease_seconds
                    )
            except Exception:
                # The lease still runs; the next beat may succeed before it expires.
                logger.warning(
                    "heartbeat failed",
                    extra={"action": "worker.heartbeat_failed", "job_id": str(self._job_id)},
                    exc_info=True,
                )
                continue
            if not held:
                self.lost.set()
                return


@dataclass
class _Context:
    runner: JobRunner
    job_id: uuid.UUID
    token: uuid.UUID
    attempt: int
    heartbeat: Heartbeat

    def stage(self, name: str, progress: int) -> None:
        if self.heartbeat.lost.is_set():
            raise LeaseLost(self.job_id)
        if self.runner.stopping.is_set():
            raise ShuttingDown
        with unit_of_work(self.runner.factory) as session:
            service.report_stage(session, self.job_id, self.token, stage=name, progress=progress)
        logger.info(
            "stage",
            extra={"action": "job.stage", "job_id": str(self.job_id), "stage": name},
        )


class JobRunner:
    """Runs deliveries of jobs. One instance per worker process, shared by its threads."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        *,
        worker_id: str,
        metrics: WorkerMetrics | None = None,
        handlers: Mapping[str, Handler] = HANDLERS,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.worker_id = worker_id
        self.metrics = metrics or WorkerMetrics()
        self.handlers = handlers
        self.stopping = threading.Event()
        self.policy = service.RetryPolicy(
            base_seconds=settings.backoff_base_seconds,
            max_seconds=settings.backoff_max_seconds,
            queue_name=settings.queue_name,
        )

    def run(self, job_id: str) -> None:
        """The Dramatiq actor's body: one delivery of `job_id`."""
        try:
            jid = uuid.UUID(job_id)
        except ValueError:
            logger.error("malformed delivery", extra={"action": "worker.bad_message"})
            return
        with unit_of_work(self.factory) as session:
            job = service.claim_job(
                session, jid, worker_id=self.worker_id, lease_seconds=self.settings.lease_seconds
            )
        if job is None:
            logger.info(
                "delivery ignored: job is not queued",
                extra={"action": "worker.duplicate_delivery", "job_id": job_id},
            )
            return
        self._count(job, JobStatus.QUEUED, JobStatus.RUNNING)
        assert job.lease_token is not None
        started = time.monotonic()
        outcome = self._attempt(job, job.lease_token)
        self.metrics.attempt_seconds.labels(job.type, outcome).observe(time.monotonic() - started)

    def _attempt(self, job: Job, token: uuid.UUID) -> str:
        log = {"job_id": str(job.id), "type": job.type, "attempt": job.attempt}
        heartbeat = Heartbeat(
            self.factory,
            job.id,
            token,
            interval=self.settings.heartbeat_seconds,
            lease_seconds=self.settings.lease_seconds,
        )
        try:
            with heartbeat:
                context = _Context(self, job.id, token, job.attempt, heartbeat)
                try:
                    result = self._handler(job.type)(context, dict(job.params))
                except CancelRequested:
                    return self._end(job, "canceled", service.cancel_attempt, token)
                except ShuttingDown:
                    return self._end(
                        job,
                        "released",
                        service.release_attempt,
                        token,
                        queue_name=self.settings.queue_name,
                    )
                except JobError as exc:
                    return self._fail(job, token, exc.code, str(exc), retryable=exc.retryable)
                except LeaseLost:
                    raise
                except Exception as exc:
                    message = "".join(traceback.format_exception(exc)).strip()
                    return self._fail(job, token, type(exc).__name__, message, retryable=True)
                return self._end(job, "succeeded", service.complete_attempt, token, result=result)
        except LeaseLost:
            # The reaper (or a newer claim) owns the job now; this attempt's outcome is void.
            logger.warning("lease lost", extra={"action": "worker.lease_lost", **log})
            return "lease_lost"

    def _handler(self, type: str) -> Handler:
        handler = self.handlers.get(type)
        if handler is None:
            raise PermanentJobError("UNKNOWN_JOB_TYPE", f"no handler for job type {type!r}")
        return handler

    def _end(self, job: Job, outcome: str, fn: Any, token: uuid.UUID, **kwargs: Any) -> str:
        with unit_of_work(self.factory) as session:
            ended: Job = fn(session, job.id, token, **kwargs)
        self._count(ended, JobStatus.RUNNING, ended.status)
        logger.info(
            outcome, extra={"action": f"job.{outcome}", "job_id": str(job.id), "type": job.type}
        )
        return outcome

    def _fail(self, job: Job, token: uuid.UUID, code: str, message: str, *, retryable: bool) -> str:
        with unit_of_work(self.factory) as session:
            ended = service.fail_attempt(
                session, job.id, token, error_code=code, error_message=message,
                retryable=retryable, policy=self.policy,
            )  # fmt: skip
        self._count(ended, JobStatus.RUNNING, ended.status)
        logger.info(
            "attempt failed",
            extra={
                "action": "job.attempt_failed",
                "job_id": str(job.id),
                "error_code": code,
                "next_status": ended.status.value,
            },
        )
        return ended.status.value

    def _count(self, job: Job, before: JobStatus, after: JobStatus) -> None:
        self.metrics.transitions.labels(job.type, before.value, after.value).inc()
