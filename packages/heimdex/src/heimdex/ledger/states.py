"""The ledger's state machine: the one table of legal transitions."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from heimdex.ledger.errors import IllegalTransition
from heimdex.models import TERMINAL_STATUSES, JobStatus

Q, R = JobStatus.QUEUED, JobStatus.RUNNING

# running -> queued is a retry (or a reclaimed lease); terminal states have no way out.
LEGAL_TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    Q: frozenset({R, JobStatus.CANCELED, JobStatus.DEAD_LETTER}),
    R: frozenset(
        {Q, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.DEAD_LETTER}
    ),
    **{status: frozenset() for status in TERMINAL_STATUSES},
}


# An operator's retry is the one way out of a terminal state, with a fresh attempt budget; a
# success is never rerun. Only `operations.retry` takes these, never a worker or the reaper.
OPERATOR_TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    JobStatus.DEAD_LETTER: frozenset({Q}),
    JobStatus.FAILED: frozenset({Q}),
    JobStatus.CANCELED: frozenset({Q}),
}


def can_transition(current: JobStatus, target: JobStatus) -> bool:
    return target in LEGAL_TRANSITIONS[current]


def ensure_transition(job_id: uuid.UUID, current: JobStatus, target: JobStatus) -> None:
    if not can_transition(current, target):
        raise IllegalTransition(job_id, current, target)


def ensure_operator_transition(job_id: uuid.UUID, current: JobStatus, target: JobStatus) -> None:
    """What an operator may do: every legal transition, and a retry out of a failure."""
    if not (can_transition(current, target) or target in OPERATOR_TRANSITIONS.get(current, ())):
        raise IllegalTransition(job_id, current, target)
