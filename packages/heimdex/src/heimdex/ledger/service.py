"""The ledger's decisions: what a submission, a cancel, an attempt's outcome or a lost lease
does to a job. Statements live in `repository`; the state machine in `states`.

Every function takes the caller's connection and never commits: a request, a claim, a batch of
outcomes or a reaper pass is one unit of work owned by its caller. Each reports the status
changes it made (`transitions.record`), delivered to the process's hook when the caller commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from heimdex.ledger import repository, transitions
from heimdex.ledger.backoff import retry_delay
from heimdex.ledger.errors import (
    IdempotencyConflict,
    InvalidBatchItem,
    InvalidParams,
    JobAlreadyFinished,
    LedgerError,
    TimeoutAboveType,
    UnknownJobType,
)
from heimdex.ledger.fingerprint import request_fingerprint
from heimdex.ledger.registry import Registry
from heimdex.ledger.repository import ClaimedJob, JobRecord, JobRow, NewJob, Outcome
from heimdex.ledger.states import ensure_transition
from heimdex.ledger.transitions import Transition
from heimdex.models import DEFAULT_QUEUE, BackoffPolicy, JobStatus


@dataclass(frozen=True)
class RetryPolicy:
    """The deployment's backoff scale; the job's own `backoff_policy` picks the curve."""

    base_seconds: float = 2.0
    max_seconds: float = 300.0


@dataclass(frozen=True)
class JobSpec:
    """One submission as the API or a caller states it."""

    type: str
    params: Mapping[str, Any]
    priority: int = 0
    max_attempts: int = 5
    backoff_policy: BackoffPolicy = BackoffPolicy.EXP
    idempotency_key: str | None = None
    run_at: datetime | None = None
    timeout_seconds: int | None = None
    """Lowers the job type's execution timeout for this job's attempts."""


@dataclass(frozen=True)
class Submitted:
    job: JobRecord
    created: bool


def _new_job(
    registry: Registry, org_id: uuid.UUID, spec: JobSpec, requested_by: str | None
) -> NewJob:
    job_type = registry.get(spec.type)
    clean = job_type.validate(spec.params)
    job_type.check_timeout(spec.timeout_seconds)
    # The fingerprint only serves to compare a replayed key's body; a job without a key has
    # none (a tenth of a bulk submit's CPU was spent hashing bodies nothing would compare).
    fingerprint = None
    if spec.idempotency_key is not None:
        body: dict[str, Any] = {
            "type": spec.type,
            "params": clean,
            "priority": spec.priority,
            "max_attempts": spec.max_attempts,
            "backoff_policy": spec.backoff_policy.value,
            "run_at": spec.run_at.isoformat() if spec.run_at else None,
        }
        if spec.timeout_seconds is not None:  # absent: the fingerprints stored before it hold
            body["timeout_seconds"] = spec.timeout_seconds
        fingerprint = request_fingerprint(body)
    return NewJob(
        org_id=org_id,
        type=spec.type,
        params=clean,
        request_fingerprint=fingerprint,
        priority=spec.priority,
        max_attempts=spec.max_attempts,
        backoff_policy=spec.backoff_policy,
        idempotency_key=spec.idempotency_key,
        requested_by=requested_by,
        run_at=spec.run_at,
        timeout_seconds=spec.timeout_seconds,
        queue=job_type.queue,
    )


def _validated(
    registry: Registry, org_id: uuid.UUID, specs: Sequence[JobSpec], requested_by: str | None
) -> list[NewJob]:
    new = []
    for index, spec in enumerate(specs):
        try:
            new.append(_new_job(registry, org_id, spec, requested_by))
        except (UnknownJobType, InvalidParams, TimeoutAboveType) as exc:
            if len(specs) == 1:
                raise
            raise InvalidBatchItem(index, exc) from None
    return new


def _first_by_key(jobs: Sequence[NewJob]) -> dict[str, NewJob]:
    """The first job of each idempotency key; a key repeated with another body is refused."""
    first: dict[str, NewJob] = {}
    for job in jobs:
        if job.idempotency_key is None:
            continue
        seen = first.setdefault(job.idempotency_key, job)
        if seen.request_fingerprint != job.request_fingerprint:
            raise LedgerError(
                f"idempotency key {job.idempotency_key!r} is used twice in this batch with "
                "different bodies"
            )
    return first


def submit_jobs(
    conn: Connection,
    registry: Registry,
    *,
    org_id: uuid.UUID,
    specs: Sequence[JobSpec],
    requested_by: str | None = None,
) -> list[Submitted]:
    """Create queued jobs (one statement for the whole batch), in the order of `specs`.

    Every spec is validated before anything is written. An idempotency key the org used before
    returns that job (`created=False`) when the body matches (by fingerprint) and raises
    `IdempotencyConflict` when it does not; two specs of one batch with the same key are one
    job. Concurrent identical submissions create one job: the insert skips conflicts on the
    unique index and the losers read the winner's row.
    """
    new = _validated(registry, org_id, specs, requested_by)
    first_by_key = _first_by_key(new)
    unique = [j for j in new if j.idempotency_key is None or first_by_key[j.idempotency_key] is j]
    inserted = repository.insert_jobs(conn, unique)
    keyed = {row.idempotency_key: row for row in inserted if row.idempotency_key is not None}
    missing = [key for key in first_by_key if key not in keyed]
    existing = repository.by_keys(conn, org_id, missing) if missing else {}
    for key in missing:
        row = existing.get(key)
        if row is None:  # deleted between the insert and the read
            raise LedgerError(f"idempotency key {key!r} is in flux; retry")
        if row.request_fingerprint != first_by_key[key].request_fingerprint:
            raise IdempotencyConflict(key, row.id)
    # INSERT ... SELECT FROM unnest returns its rows in the order of the input.
    plain = iter(row for row in inserted if row.idempotency_key is None)
    results: list[Submitted] = []
    for job in new:
        new_key = job.idempotency_key
        if new_key is None:
            results.append(Submitted(next(plain), True))
        elif new_key in keyed:
            results.append(Submitted(keyed[new_key], first_by_key[new_key] is job))
        else:
            results.append(Submitted(existing[new_key], False))
    transitions.record(conn, (Transition(row.type, None, JobStatus.QUEUED) for row in inserted))
    return results


def submit_job(
    conn: Connection,
    registry: Registry,
    *,
    org_id: uuid.UUID,
    spec: JobSpec,
    requested_by: str | None = None,
) -> Submitted:
    """`submit_jobs` for one job: a single statement when the key is new (or absent)."""
    return submit_jobs(conn, registry, org_id=org_id, specs=[spec], requested_by=requested_by)[0]


def cancel_job(
    conn: Connection, *, org_id: uuid.UUID, job_id: uuid.UUID, requested_by: str | None = None
) -> JobRow:
    """Cancel a queued job now; flag a running one for its next stage boundary.

    A finished job raises `JobAlreadyFinished`; asking twice for a running job is harmless.
    """
    job = repository.get_job(conn, job_id, org_id=org_id, lock=True)
    detail = {"by": requested_by}
    if job.status is JobStatus.QUEUED:
        ensure_transition(job.id, job.status, JobStatus.CANCELED)
        canceled = repository.cancel_queued(conn, job_id, {"action": "canceled", **detail})
        transitions.record(conn, [Transition(job.type, JobStatus.QUEUED, JobStatus.CANCELED)])
        return canceled
    if job.status is JobStatus.RUNNING:
        if job.cancel_requested:
            return job
        return repository.request_cancel(conn, job_id, {"action": "cancel_requested", **detail})
    raise JobAlreadyFinished(job_id, job.status)


def claim(
    conn: Connection,
    *,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    queues: Sequence[str] = (DEFAULT_QUEUE,),
) -> repository.Claim:
    """`repository.claim`, reported: up to `limit` due jobs of `queues` leased to
    `worker_id`."""
    claimed = repository.claim(
        conn, worker_id=worker_id, limit=limit, lease_seconds=lease_seconds, queues=queues
    )
    transitions.record(
        conn, (Transition(job.type, JobStatus.QUEUED, JobStatus.RUNNING) for job in claimed.jobs)
    )
    return claimed


def write_outcomes(conn: Connection, outcomes: Sequence[Outcome]) -> set[uuid.UUID]:
    """End running attempts still holding their lease (`repository.write_outcomes`), reported;
    the ids written (an outcome missing from them lost its lease and changed nothing)."""
    written = repository.write_outcomes(conn, outcomes)
    if written:
        status = {o.job_id: o.status for o in outcomes}
        transitions.record(
            conn,
            (Transition(type_, JobStatus.RUNNING, status[id_]) for id_, type_ in written.items()),
        )
    return set(written)


def succeeded(job: JobRow | ClaimedJob, result: Mapping[str, Any] | None) -> Outcome:
    ensure_transition(job.id, job.status, JobStatus.SUCCEEDED)
    return Outcome(
        job.id, job.lease_token, JobStatus.SUCCEEDED, job.attempt, {"action": "succeeded"},
        result=dict(result or {}),
    )  # fmt: skip


def canceled(job: JobRow | ClaimedJob, *, stage: str | None) -> Outcome:
    """The attempt stopped at a stage boundary (after `stage`) because a cancel was requested."""
    ensure_transition(job.id, job.status, JobStatus.CANCELED)
    return Outcome(
        job.id, job.lease_token, JobStatus.CANCELED, job.attempt,
        {"action": "canceled", "stage": stage},
    )  # fmt: skip


def released(job: JobRow | ClaimedJob) -> Outcome:
    """Back to the queue, due now, the attempt not counted (the worker is shutting down)."""
    ensure_transition(job.id, job.status, JobStatus.QUEUED)
    return Outcome(job.id, job.lease_token, JobStatus.QUEUED, job.attempt, {"action": "released"})


def returned_unstarted(job: JobRow) -> Outcome:
    """The lease expired on a job its worker claimed but never started (prefetched, then the
    worker was lost): not an attempt. Back to the queue, due now, `attempt` as it was; a cancel
    requested meanwhile wins."""
    detail = {"worker": job.leased_by}
    if job.cancel_requested:
        ensure_transition(job.id, job.status, JobStatus.CANCELED)
        return Outcome(
            job.id, job.lease_token, JobStatus.CANCELED, job.attempt,
            {"action": "canceled", "unstarted": True, **detail},
        )  # fmt: skip
    ensure_transition(job.id, job.status, JobStatus.QUEUED)
    return Outcome(
        job.id, job.lease_token, JobStatus.QUEUED, job.attempt,
        {"action": "returned_unstarted", **detail},
    )  # fmt: skip


def after_failure(
    job: JobRow | ClaimedJob,
    *,
    error_code: str,
    error_message: str,
    retryable: bool,
    policy: RetryPolicy,
    action: str = "attempt_failed",
    extra: Mapping[str, Any] | None = None,
) -> Outcome:
    """The one retry rule: count the attempt, then cancel, fail, dead-letter or retry later.

    `job` must be the row as locked now (its `cancel_requested` is read here).
    """
    attempt = job.attempt + 1
    detail: dict[str, Any] = {
        "action": action,
        "attempt": attempt,
        "error": {"code": error_code, "message": error_message},
        **(extra or {}),
    }
    delay = 0.0
    if job.cancel_requested:
        target = JobStatus.CANCELED
    elif not retryable:
        target = JobStatus.FAILED
    elif attempt >= job.max_attempts:
        target = JobStatus.DEAD_LETTER
    else:
        target = JobStatus.QUEUED
        delay = retry_delay(
            job.backoff_policy, attempt, base=policy.base_seconds, cap=policy.max_seconds
        )
        detail["retry_in_seconds"] = delay
    ensure_transition(job.id, job.status, target)
    return Outcome(
        job.id, job.lease_token, target, attempt, detail, delay_seconds=delay,
        error_code=error_code, error_message=error_message,
    )  # fmt: skip


@dataclass(frozen=True)
class Failure:
    job_id: uuid.UUID
    lease_token: uuid.UUID
    error_code: str
    error_message: str
    retryable: bool
    detail: Mapping[str, Any] | None = None
    """Added to the event (e.g. `stuck`: the handler did not stop at its deadline)."""


def fail_attempts(
    conn: Connection, failures: Sequence[Failure], *, policy: RetryPolicy
) -> list[Outcome]:
    """End failed attempts that still hold their lease by the retry rule; the outcomes written.

    Reads the rows locked (a cancel requested meanwhile wins), then writes in one statement.
    """
    by_id = {f.job_id: f for f in failures}
    rows = repository.lock_held(conn, [(f.job_id, f.lease_token) for f in failures])
    outcomes = [
        after_failure(
            row,
            error_code=by_id[row.id].error_code,
            error_message=by_id[row.id].error_message,
            retryable=by_id[row.id].retryable,
            policy=policy,
            extra=by_id[row.id].detail,
        )
        for row in rows
    ]
    write_outcomes(conn, outcomes)
    return outcomes


def reap_expired_leases(
    conn: Connection, *, policy: RetryPolicy, stale_after_seconds: float, limit: int = 100
) -> list[Outcome]:
    """End the attempts of running jobs whose lease expired (their worker is gone).

    An attempt that began (its handler started: `started_at` set) is counted: the retry rule
    with code `LEASE_EXPIRED`, requeued with backoff or dead-lettered. A job its worker only
    prefetched (`started_at` NULL, see the worker) is `returned_unstarted`, its attempt budget
    intact. The late worker's own outcome then finds the lease gone and changes nothing.
    """
    outcomes = []
    for row in repository.lock_expired(conn, stale_after_seconds=stale_after_seconds, limit=limit):
        if row.started_at is None:
            outcomes.append(returned_unstarted(row))
            continue
        holder = row.leased_by or "an unknown worker"
        outcomes.append(
            after_failure(
                row,
                error_code="LEASE_EXPIRED",
                error_message=f"the lease held by {holder} expired without a heartbeat "
                "(worker lost?)",
                retryable=True,
                policy=policy,
                action="lease_expired",
            )
        )
    write_outcomes(conn, outcomes)
    return outcomes
