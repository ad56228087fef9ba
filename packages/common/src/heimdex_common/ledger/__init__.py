"""The job ledger: its state machine, domain errors and repository."""

from heimdex_common.ledger.errors import (
    DuplicateIdempotencyKey,
    IllegalTransition,
    JobNotFound,
    LedgerError,
)
from heimdex_common.ledger.repository import (
    create_job,
    get_job,
    list_events,
    record_event,
    transition,
)
from heimdex_common.ledger.states import LEGAL_TRANSITIONS, can_transition, ensure_transition

__all__ = [
    "LEGAL_TRANSITIONS",
    "DuplicateIdempotencyKey",
    "IllegalTransition",
    "JobNotFound",
    "LedgerError",
    "can_transition",
    "create_job",
    "ensure_transition",
    "get_job",
    "list_events",
    "record_event",
    "transition",
]
