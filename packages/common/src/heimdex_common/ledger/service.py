"""The job lifecycle shared by the API, the workers, the dispatcher and the reaper.

Every function takes the caller's session and never commits: a request, a claim, a stage
report, an attempt's outcome or a reaper pass is one unit of work owned by its caller.
Status changes go through `repository.transition`, so the state machine is checked once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, literal, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from heimdex_common.ledger.backoff import retry_delay
from heimdex_common.ledger.errors import (
    CancelRequested,
    IdempotencyConflict,
    JobAlreadyFinished,
    JobNotFound,
    LeaseLost,
    LedgerError,
)
from heimdex_common.ledger.fingerprint import request_fingerprint
from heimdex_common.ledger.jobtypes import validate_params
from heimdex_common.ledger.outbox import DEFAULT_QUEUE, enqueue_delivery
from heimdex_common.ledger.repository import record_event, transition
from heimdex_common.models import (
    STAGE_MAX,
    TERMINAL_STATUSES,
    BackoffPolicy,
    Job,
    JobStatus,
)


@dataclass(frozen=True)
class RetryPolicy:
    """The deployment's backoff scale; the job's own `backoff_policy` picks the curve."""

    base_seconds: float = 2.0
    max_seconds: float = 300.0
    queue_name: str = DEFAULT_QUEUE


def submit_job(
    session: Session,
    *,
    org_id: uuid.UUID,
    type: str,
    params: dict[str, Any],
    priority: int = 0,
    max_attempts: int = 5,
    backoff_policy: BackoffPolicy = BackoffPolicy.EXP,
    idempotency_key: str | None = None,
    requested_by: str | None = None,
    queue_name: str = DEFAULT_QUEUE,
) -> tuple[Job, bool]:
    """Create a queued job, its first event and its outbox message; `(job, created)`.

    With an `idempotency_key` already used in the org: the same body (by fingerprint) returns
    the existing job with `created=False`, a different body raises `IdempotencyConflict`.
    Concurrent identical submissions create one job: the insert is `ON CONFLICT DO NOTHING` on
    the partial unique index, and the losers read the winner's row once it commits.
    """
    clean = validate_params(type, params)
    fingerprint = request_fingerprint(
        {
            "type": type,
            "params": clean,
            "priority": priority,
            "max_attempts": max_attempts,
            "backoff_policy": backoff_policy.value,
        }
    )
    insert = pg_insert(Job).values(
        org_id=org_id,
        type=type,
        params=clean,
        priority=priority,
        max_attempts=max_attempts,
        backoff_policy=backoff_policy,
        idempotency_key=idempotency_key,
        request_fingerprint=fingerprint,
        requested_by=requested_by,
    )
    if idempotency_key is not None:
        insert = insert.on_conflict_do_nothing(
            index_elements=[Job.org_id, Job.idempotency_key],
            index_where=Job.idempotency_key.is_not(None),
        )
    job_id = session.execute(insert.returning(Job.id)).scalar_one_or_none()
    if job_id is None:
        assert idempotency_key is not None
        existing = session.scalars(
            select(Job)
            .where(Job.org_id == org_id, Job.idempotency_key == idempotency_key)
            .execution_options(populate_existing=True)
        ).one_or_none()
        if existing is None:  # the conflicting row vanished (deleted) between the two reads
            raise LedgerError(f"idempotency key {idempotency_key!r} is in flux; retry")
        if existing.request_fingerprint != fingerprint:
            raise IdempotencyConflict(idempotency_key, existing.id)
        return existing, False
    job = session.get_one(Job, job_id)
    record_event(session, job, prev_status=None, detail={"action": "submitted"})
    enqueue_delivery(session, job.id, queue_name=queue_name)
    return job, True


def list_jobs(
    session: Session,
    *,
    org_id: uuid.UUID,
    status: JobStatus | None = None,
    type: str | None = None,
    limit: int = 50,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> Sequence[Job]:
    """The org's jobs, newest first, after the keyset cursor `before` (created_at, id)."""
    query = select(Job).where(Job.org_id == org_id)
    if status is not None:
        query = query.where(Job.status == status)
    if type is not None:
        query = query.where(Job.type == type)
    if before is not None:
        query = query.where(
            tuple_(Job.created_at, Job.id) < tuple_(literal(before[0]), literal(before[1]))
        )
    return session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)).all()


def _locked(session: Session, job_id: uuid.UUID, org_id: uuid.UUID | None = None) -> Job:
    query = select(Job).where(Job.id == job_id)
    if org_id is not None:
        query = query.where(Job.org_id == org_id)
    job = session.scalars(
        query.with_for_update().execution_options(populate_existing=True)
    ).one_or_none()
    if job is None:
        raise JobNotFound(job_id)
    return job


def cancel_job(
    session: Session, *, org_id: uuid.UUID, job_id: uuid.UUID, requested_by: str | None = None
) -> Job:
    """Cancel a queued job now; flag a running one for its next stage boundary.

    A finished job raises `JobAlreadyFinished`; asking twice for a running job is harmless.
    """
    job = _locked(session, job_id, org_id)
    if job.status is JobStatus.QUEUED:
        transition(
            session, job, JobStatus.CANCELED, detail={"action": "canceled", "by": requested_by}
        )
    elif job.status is JobStatus.RUNNING:
        if not job.cancel_requested:
            job.cancel_requested = True
            job.updated_at = func.now()
            session.flush()
            session.refresh(job)
            record_event(
                session,
                job,
                prev_status=JobStatus.RUNNING,
                detail={"action": "cancel_requested", "by": requested_by},
            )
    else:
        raise JobAlreadyFinished(job_id, job.status)
    return job


def claim_job(
    session: Session, job_id: uuid.UUID, *, worker_id: str, lease_seconds: float
) -> Job | None:
    """Take a queued job for one attempt, or None when it is not queued (a duplicate delivery,
    a canceled job, or another worker's claim). The job gets a fresh `lease_token`."""
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.RUNNING,
            started_at=func.now(),
            updated_at=func.now(),
            lease_token=uuid.uuid4(),
            leased_by=worker_id,
            lease_expires_at=func.now() + timedelta(seconds=lease_seconds),
            heartbeat_at=func.now(),
            stage=None,
            progress=0,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if claimed is None:
        return None
    job = session.get_one(Job, job_id, populate_existing=True)
    record_event(
        session,
        job,
        prev_status=JobStatus.QUEUED,
        detail={"action": "claimed", "attempt": job.attempt, "worker": worker_id},
    )
    return job


def renew_lease(
    session: Session, job_id: uuid.UUID, lease_token: uuid.UUID, *, lease_seconds: float
) -> bool:
    """Extend the lease of a running attempt; False when the attempt no longer holds it."""
    renewed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_token == lease_token, Job.status == JobStatus.RUNNING)
        .values(
            heartbeat_at=func.now(),
            lease_expires_at=func.now() + timedelta(seconds=lease_seconds),
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    return renewed is not None


def _held(session: Session, job_id: uuid.UUID, lease_token: uuid.UUID) -> Job:
    job = _locked(session, job_id)
    if job.status is not JobStatus.RUNNING or job.lease_token != lease_token:
        raise LeaseLost(job_id)
    return job


def _clear_lease(job: Job) -> None:
    job.lease_token = None
    job.leased_by = None
    job.lease_expires_at = None


def report_stage(
    session: Session, job_id: uuid.UUID, lease_token: uuid.UUID, *, stage: str, progress: int
) -> Job:
    """Record a stage boundary (row and event). This is where a cancel request takes effect:
    `CancelRequested` is raised instead, and the caller ends the attempt with `cancel_attempt`.
    """
    job = _held(session, job_id, lease_token)
    if job.cancel_requested:
        raise CancelRequested(job_id)
    job.stage = stage[:STAGE_MAX]
    job.progress = max(0, min(100, progress))
    job.updated_at = func.now()
    session.flush()
    session.refresh(job)
    record_event(
        session,
        job,
        prev_status=JobStatus.RUNNING,
        detail={"action": "progress", "stage": job.stage, "progress": job.progress},
    )
    return job


def complete_attempt(
    session: Session, job_id: uuid.UUID, lease_token: uuid.UUID, *, result: dict[str, Any]
) -> Job:
    job = _held(session, job_id, lease_token)
    job.result = result
    job.progress = 100
    _clear_lease(job)
    transition(session, job, JobStatus.SUCCEEDED, detail={"action": "succeeded"})
    return job


def cancel_attempt(session: Session, job_id: uuid.UUID, lease_token: uuid.UUID) -> Job:
    job = _held(session, job_id, lease_token)
    _clear_lease(job)
    transition(session, job, JobStatus.CANCELED, detail={"action": "canceled", "stage": job.stage})
    return job


def release_attempt(
    session: Session, job_id: uuid.UUID, lease_token: uuid.UUID, *, queue_name: str
) -> Job:
    """Give a running job back to the queue without counting the attempt (worker shutdown)."""
    job = _held(session, job_id, lease_token)
    _clear_lease(job)
    transition(session, job, JobStatus.QUEUED, detail={"action": "released"})
    enqueue_delivery(session, job.id, queue_name=queue_name)
    return job


def fail_attempt(
    session: Session,
    job_id: uuid.UUID,
    lease_token: uuid.UUID,
    *,
    error_code: str,
    error_message: str,
    retryable: bool,
    policy: RetryPolicy,
) -> Job:
    """End a failed attempt: retry later, or `failed` (not retryable), or `dead_letter`."""
    job = _held(session, job_id, lease_token)
    return _after_failure(
        session, job, error_code, error_message, retryable=retryable, policy=policy,
        action="attempt_failed",
    )  # fmt: skip


def _after_failure(
    session: Session,
    job: Job,
    error_code: str,
    error_message: str,
    *,
    retryable: bool,
    policy: RetryPolicy,
    action: str,
) -> Job:
    """The one retry rule: count the attempt, then cancel, fail, dead-letter or requeue."""
    job.attempt += 1
    _clear_lease(job)
    detail: dict[str, Any] = {"action": action, "attempt": job.attempt}
    if job.cancel_requested:
        target = JobStatus.CANCELED
    elif not retryable:
        target = JobStatus.FAILED
    elif job.attempt >= job.max_attempts:
        target = JobStatus.DEAD_LETTER
    else:
        target = JobStatus.QUEUED
        delay = retry_delay(
            job.backoff_policy, job.attempt, base=policy.base_seconds, cap=policy.max_seconds
        )
        detail["retry_in_seconds"] = delay
        enqueue_delivery(session, job.id, delay_seconds=delay, queue_name=policy.queue_name)
    transition(
        session, job, target, detail=detail, error_code=error_code, error_message=error_message
    )
    return job


def reap_expired_leases(
    session: Session, *, policy: RetryPolicy, stale_after_seconds: float, limit: int = 100
) -> list[Job]:
    """Return running jobs whose lease expired to the queue, counting the attempt.

    Rows running without a lease (from before leases existed) count as expired once untouched
    for `stale_after_seconds`. SKIP LOCKED keeps reapers and live attempts out of each other's
    way; an attempt whose job was reaped finds its lease gone (`LeaseLost`) and stops.
    """
    now = func.now()
    jobs = session.scalars(
        select(Job)
        .where(
            Job.status == JobStatus.RUNNING,
            or_(
                Job.lease_expires_at < now,
                and_(
                    Job.lease_expires_at.is_(None),
                    Job.updated_at < now - timedelta(seconds=stale_after_seconds),
                ),
            ),
        )
        .order_by(Job.lease_expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    ).all()
    for job in jobs:
        holder = job.leased_by or "an unknown worker"
        _after_failure(
            session, job, "LEASE_EXPIRED",
            f"the lease held by {holder} expired without a heartbeat (worker lost?)",
            retryable=True, policy=policy, action="lease_expired",
        )  # fmt: skip
    return list(jobs)


def is_finished(job: Job) -> bool:
    return job.status in TERMINAL_STATUSES
