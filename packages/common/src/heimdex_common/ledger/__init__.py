"""The job ledger: its state machine, decisions (`service`), statements (`repository`) and
job types (`registry`)."""

from heimdex_common.ledger.errors import (
    IllegalTransition,
    JobNotFound,
    LedgerError,
)
from heimdex_common.ledger.states import LEGAL_TRANSITIONS, can_transition, ensure_transition

__all__ = [
    "LEGAL_TRANSITIONS",
    "IllegalTransition",
    "JobNotFound",
    "LedgerError",
    "can_transition",
    "ensure_transition",
]
