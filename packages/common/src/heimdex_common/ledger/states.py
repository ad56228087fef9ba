"""The ledger's state machine: the one table of legal transitions."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from heimdex_common.ledger.errors import IllegalTransition
from heimdex_common.models import TERMINAL_STATUSES, JobStatus

Q, R = JobStatus.QUEUED, JobStatus.RUNNING

# running -> queued is a retry (or a reclaimed lease); terminal states have no way out.
LEGAL_TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    Q: frozenset({R, JobStatus.CANCELED, JobStatus.DEAD_LETTER}),
    R: frozenset(
        {Q, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.DEAD_LETTER}
    ),
    **{status: frozenset() for status in TERMINAL_STATUSES},
}


def can_transition(current: JobStatus, target: JobStatus) -> bool:
    return target in LEGAL_TRANSITIONS[current]


def ensure_transition(job_id: uuid.UUID, current: JobStatus, target: JobStatus) -> None:
    if not can_transition(current, target):
        raise IllegalTransition(job_id, current, target)
