"""Domain errors of the ledger. The API maps these to HTTP statuses in one place."""

from __future__ import annotations

import uuid

from heimdex_common.errors import HeimdexError
from heimdex_common.models import JobStatus


class LedgerError(HeimdexError):
    """Base class of every ledger rule violation."""


class JobNotFound(LedgerError):
    def __init__(self, job_id: uuid.UUID) -> None:
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


class DuplicateIdempotencyKey(LedgerError):
    """Another job of the same org already holds this idempotency key."""

    def __init__(self, org_id: uuid.UUID, key: str) -> None:
        super().__init__(f"idempotency key {key!r} is already used in org {org_id}")
        self.org_id = org_id
        self.key = key


class IllegalTransition(LedgerError):
    def __init__(self, job_id: uuid.UUID, current: JobStatus, target: JobStatus) -> None:
        super().__init__(f"job {job_id}: illegal transition {current.value} -> {target.value}")
        self.job_id = job_id
        self.current = current
        self.target = target
