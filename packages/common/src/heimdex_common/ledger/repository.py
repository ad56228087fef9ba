"""Reads and writes of the ledger. Every function takes the caller's session and never commits."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from heimdex_common.ledger.errors import DuplicateIdempotencyKey, JobNotFound
from heimdex_common.ledger.states import ensure_transition
from heimdex_common.models import (
    ERROR_CODE_MAX,
    ERROR_MESSAGE_MAX,
    TERMINAL_STATUSES,
    BackoffPolicy,
    Job,
    JobEvent,
    JobStatus,
)

IDEMPOTENCY_INDEX = "idx_job__org_id_idempotency_key"


def _constraint_name(exc: IntegrityError) -> str | None:
    diag = getattr(exc.orig, "diag", None)
    return getattr(diag, "constraint_name", None)


def create_job(
    session: Session,
    *,
    org_id: uuid.UUID,
    type: str,
    priority: int = 0,
    max_attempts: int = 5,
    backoff_policy: BackoffPolicy = BackoffPolicy.EXP,
    idempotency_key: str | None = None,
    requested_by: str | None = None,
    detail: dict[str, Any] | None = None,
) -> Job:
    """Insert a queued job and its first event.

    Raises `DuplicateIdempotencyKey` when the org already has a job with this key; the insert
    runs in a savepoint so the caller's transaction stays usable after that error.
    """
    job = Job(
        org_id=org_id,
        type=type,
        status=JobStatus.QUEUED,
        priority=priority,
        max_attempts=max_attempts,
        backoff_policy=backoff_policy,
        idempotency_key=idempotency_key,
        requested_by=requested_by,
    )
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError as exc:
        if idempotency_key is not None and _constraint_name(exc) == IDEMPOTENCY_INDEX:
            raise DuplicateIdempotencyKey(org_id, idempotency_key) from None
        raise
    record_event(session, job, prev_status=None, detail=detail)
    return job


def get_job(session: Session, job_id: uuid.UUID, *, org_id: uuid.UUID | None = None) -> Job:
    """The job with this id; with `org_id`, a job of another org is reported as not found."""
    job = session.get(Job, job_id)
    if job is None or (org_id is not None and job.org_id != org_id):
        raise JobNotFound(job_id)
    return job


def record_event(
    session: Session,
    job: Job,
    *,
    prev_status: JobStatus | None,
    detail: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(
        job_id=job.id,
        prev_status=prev_status.value if prev_status is not None else None,
        next_status=job.status.value,
        detail_json=detail,
        # clock_timestamp, not now(): events of one transaction must still sort in order.
        ts=func.clock_timestamp(),
    )
    session.add(event)
    session.flush()
    return event


def transition(
    session: Session,
    job: Job,
    target: JobStatus,
    *,
    detail: dict[str, Any] | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> JobEvent:
    """Move `job` to `target` if the state machine allows it, and record the event.

    Keeps the timestamps consistent with the status (`started_at` when running, `finished_at`
    exactly when terminal). An error longer than its column is cut in the row; the event's
    detail keeps the full text.
    """
    current = job.status
    ensure_transition(job.id, current, target)
    now = func.now()
    job.status = target
    job.updated_at = now
    if target is JobStatus.RUNNING:
        job.started_at = now
    job.finished_at = now if target in TERMINAL_STATUSES else None
    event_detail = dict(detail or {})
    if error_code is not None or error_message is not None:
        job.last_error_code = error_code[:ERROR_CODE_MAX] if error_code else None
        job.last_error_message = error_message[:ERROR_MESSAGE_MAX] if error_message else None
        event_detail["error"] = {"code": error_code, "message": error_message}
    session.flush()
    session.refresh(job)
    return record_event(session, job, prev_status=current, detail=event_detail or None)


def list_events(session: Session, job_id: uuid.UUID) -> Sequence[JobEvent]:
    return session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.ts, JobEvent.id)
    ).all()
