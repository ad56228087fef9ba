"""The job ledger: its state machine, decisions (`service`), statements (`repository`) and
job types (`registry`)."""

from heimdex.ledger.errors import (
    IllegalTransition,
    JobNotFound,
    LedgerError,
)
from heimdex.ledger.states import LEGAL_TRANSITIONS, can_transition, ensure_transition

__all__ = [
    "LEGAL_TRANSITIONS",
    "IllegalTransition",
    "JobNotFound",
    "LedgerError",
    "can_transition",
    "ensure_transition",
]
