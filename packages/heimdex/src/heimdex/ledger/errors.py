"""Domain errors of the ledger. The API maps these to HTTP statuses in one place."""

from __future__ import annotations

import uuid

from heimdex.errors import HeimdexError
from heimdex.models import JobStatus


class LedgerError(HeimdexError):
    """Base class of every ledger rule violation."""


class JobNotFound(LedgerError):
    def __init__(self, job_id: uuid.UUID) -> None:
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


class IllegalTransition(LedgerError):
    def __init__(self, job_id: uuid.UUID, current: JobStatus, target: JobStatus) -> None:
        super().__init__(f"job {job_id}: illegal transition {current.value} -> {target.value}")
        self.job_id = job_id
        self.current = current
        self.target = target


class IdempotencyConflict(LedgerError):
    """The idempotency key was used before with a different request body."""

    def __init__(self, key: str, job_id: uuid.UUID) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used for job {job_id} with a different body; "
            "use a new key for a different request"
        )
        self.key = key
        self.job_id = job_id


class JobAlreadyFinished(LedgerError):
    def __init__(self, job_id: uuid.UUID, status: JobStatus) -> None:
        super().__init__(
            f"job {job_id} is already {status.value}; only queued or running jobs can change"
        )
        self.job_id = job_id
        self.status = status


class UnknownJobType(LedgerError):
    def __init__(self, type: str, known: list[str]) -> None:
        super().__init__(f"unknown job type {type!r}; known types: {', '.join(known)}")
        self.type = type


class InvalidParams(LedgerError):
    def __init__(self, type: str, problems: str) -> None:
        super().__init__(f"invalid params for job type {type!r}: {problems}")
        self.type = type


class TimeoutAboveType(LedgerError):
    """A submission asked for a longer timeout than its job type allows."""

    def __init__(self, type: str, asked: int, allowed: int) -> None:
        super().__init__(
            f"timeout_seconds {asked} is above the {allowed} s timeout of job type {type!r}; "
            "a submission may only lower it"
        )
        self.type = type


class LeaseLost(LedgerError):
    """The attempt no longer holds the job: the reaper requeued it or another claim won."""

    def __init__(self, job_id: uuid.UUID) -> None:
        super().__init__(f"job {job_id}: the lease of this attempt is no longer held")
        self.job_id = job_id


class CancelRequested(LedgerError):
    """Raised at a stage boundary of a job whose cancellation was requested."""

    def __init__(self, job_id: uuid.UUID) -> None:
        super().__init__(f"job {job_id}: cancel requested")
        self.job_id = job_id


class InvalidBatchItem(LedgerError):
    """One job of a batch is refused, so the whole batch is."""

    def __init__(self, index: int, cause: LedgerError) -> None:
        super().__init__(f"jobs[{index}]: {cause}; nothing in this batch was submitted")
        self.index = index


class NotEligible(LedgerError):
    """An operator action asked of a job in a state it does not apply to."""

    def __init__(self, job_id: uuid.UUID, action: str, status: JobStatus, applies_to: str) -> None:
        super().__init__(f"job {job_id} is {status.value}; {action} applies to {applies_to} jobs")
        self.job_id = job_id
        self.action = action
        self.status = status
