"""The status changes the ledger makes, reported to one hook per process.

Every ledger function that changes a job's status reports what its statements did (`record`):
submit, claim, outcomes, the reaper, a cancel, operators' retry, cancel and requeue, retention.
A process that wants to hear them (its metrics) installs its hook on its engine (`observe`);
no caller counts by hand. A change reaches the hook when the caller's transaction commits (at
once on an autocommit connection), and never if it rolls back: the caller owns the transaction,
so only its commit makes a change true.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from typing import NamedTuple

from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import SQLAlchemyError

from heimdex.models import JobStatus

logger = logging.getLogger(__name__)


class Transition(NamedTuple):
    """Jobs of `type` went from `before` to `after`. `before` None: the job entered the ledger
    (submitted); `after` None: it left it (deleted by retention). A requeue is queued -> queued
    (the job waits its turn again)."""

    type: str
    before: JobStatus | None
    after: JobStatus | None


Hook = Callable[[Mapping[Transition, int]], None]
"""Hears committed changes: how many jobs made each transition."""

_HOOK = "heimdex.transitions.hook"
_PENDING = "heimdex.transitions.pending"


def observe(engine: Engine, hook: Hook) -> None:
    """Deliver to `hook` every change the ledger makes through `engine` (once per engine)."""

    def connected(conn: Connection) -> None:
        conn.info[_HOOK] = hook

    def committed(conn: Connection) -> None:
        pending = conn.info.pop(_PENDING, None)
        if pending:
            _deliver(hook, pending)

    def rolled_back(conn: Connection) -> None:
        # A connection the server dropped is invalidated before the rollback: it has no info
        # left to clear, and what it held pending is void with it.
        with suppress(SQLAlchemyError):
            conn.info.pop(_PENDING, None)

    event.listen(engine, "engine_connect", connected)
    event.listen(engine, "commit", committed)
    event.listen(engine, "rollback", rolled_back)


def record(conn: Connection, changes: Iterable[Transition]) -> None:
    """Report `changes`, made by statements on `conn`, to the engine's hook (if it has one)."""
    hook: Hook | None = conn.info.get(_HOOK)
    if hook is None:
        return
    counted = Counter(changes)
    if not counted:
        return
    if getattr(conn.connection.driver_connection, "autocommit", False):
        _deliver(hook, counted)
        return
    pending: Counter[Transition] = conn.info.setdefault(_PENDING, Counter())
    pending.update(counted)


def _deliver(hook: Hook, changes: Mapping[Transition, int]) -> None:
    # The hook runs inside the caller's commit: a failing hook must not fail the commit.
    try:
        hook(changes)
    except Exception:
        logger.exception("transition hook failed", extra={"action": "transitions.hook_failed"})
