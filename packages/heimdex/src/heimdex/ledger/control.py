"""What an operator sets on the queues: caps on jobs running per org, per org in a queue and
per queue, an org's weight in the fair queue, and pauses of a queue, a job type or an org (see
QUEUES, CAPS, SHARES AND PAUSE in repository/worker.py). Every change is checked first (bad
input changes nothing) and written with an event naming the actor and the reason, in the
caller's transaction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import Connection

from heimdex.errors import HeimdexError
from heimdex.ledger.errors import LedgerError
from heimdex.ledger.registry import check_queue_name
from heimdex.ledger.repository import limits as repo
from heimdex.ledger.repository.limits import Limit, Pause

MAX_RUNNING_MAX = 1_000_000
WEIGHT_MAX = 1000
ACTOR_MAX = 200
REASON_MAX = 1000
PAUSE_KINDS = ("queue", "type", "org")

__all__ = [
    "ControlConflict",
    "ControlNotFound",
    "InvalidControl",
    "Limit",
    "Pause",
    "Who",
    "pause",
    "resume",
    "set_limit",
    "unset_limit",
]


class InvalidControl(LedgerError):
    """A cap, weight, scope or pause that cannot be (the request changes nothing)."""


class ControlNotFound(LedgerError):
    """No such cap, or no such pause."""


class ControlConflict(LedgerError):
    """Already so (a pause of what is paused)."""


@dataclass(frozen=True)
class Who:
    """Who changes it and why; both go into the change's event."""

    actor: str
    reason: str

    def checked(self) -> Who:
        actor, reason = self.actor.strip(), self.reason.strip()
        if not 1 <= len(actor) <= ACTOR_MAX:
            raise InvalidControl(f"the actor must be 1 to {ACTOR_MAX} characters")
        if not 1 <= len(reason) <= REASON_MAX:
            raise InvalidControl(f"a reason is needed (1 to {REASON_MAX} characters)")
        return Who(actor, reason)


def _scope(org_id: uuid.UUID | None, queue: str | None) -> dict[str, str | None]:
    if org_id is None and queue is None:
        raise InvalidControl("name an org (--org), a queue (--queue), or both")
    if queue is not None:
        try:
            check_queue_name(queue)
        except HeimdexError as exc:
            raise InvalidControl(str(exc)) from None
    return {"org_id": str(org_id) if org_id else None, "queue": queue}


def set_limit(
    conn: Connection,
    who: Who,
    *,
    org_id: uuid.UUID | None,
    queue: str | None = None,
    max_running: int | None = None,
    weight: int | None = None,
) -> Limit:
    """Set a scope's cap on jobs running at once and/or an org's weight; counts the slots its
    jobs hold now, so the cap applies from this commit."""
    who = who.checked()
    scope = _scope(org_id, queue)
    if max_running is None and weight is None:
        raise InvalidControl("set --max-running N, --weight W, or both")
    if max_running is not None and not 0 <= max_running <= MAX_RUNNING_MAX:
        raise InvalidControl(f"--max-running must be 0 to {MAX_RUNNING_MAX}, not {max_running}")
    if weight is not None:
        if not 1 <= weight <= WEIGHT_MAX:
            raise InvalidControl(f"--weight must be 1 to {WEIGHT_MAX}, not {weight}")
        if org_id is None or queue is not None:
            raise InvalidControl("a weight is an org's (--org without --queue)")
    repo.lock_placer(conn)
    limit = repo.set_limit(conn, org_id=org_id, queue=queue, max_running=max_running, weight=weight)
    repo.record_event(
        conn,
        action="limit_set",
        scope={**scope, "max_running": max_running, "weight": weight},
        actor=who.actor,
        reason=who.reason,
    )
    return limit


def unset_limit(
    conn: Connection,
    who: Who,
    *,
    org_id: uuid.UUID | None,
    queue: str | None = None,
    cap: bool = True,
    weight: bool = True,
) -> Limit:
    """Drop a scope's cap and/or weight; its held jobs go back to the placer. Returns what it
    was."""
    who = who.checked()
    scope = _scope(org_id, queue)
    repo.lock_placer(conn)
    before = repo.unset_limit(conn, org_id=org_id, queue=queue, cap=cap, weight=weight)
    if before is None:
        raise ControlNotFound(f"no cap or weight is set for {_describe(scope)}")
    repo.record_event(
        conn,
        action="limit_unset",
        scope={**scope, "max_running": cap, "weight": weight},
        actor=who.actor,
        reason=who.reason,
    )
    return before


def _describe(scope: dict[str, str | None]) -> str:
    return " in ".join(f"{k.removesuffix('_id')} {v}" for k, v in scope.items() if v is not None)


def _pause_target(kind: str, value: str) -> str:
    if kind not in PAUSE_KINDS:
        raise InvalidControl(f"pause a queue, a type or an org, not {kind!r}")
    value = value.strip()
    if kind == "org":
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise InvalidControl(f"org {value!r} is not a UUID") from None
    if kind == "queue":
        try:
            return check_queue_name(value)
        except HeimdexError as exc:
            raise InvalidControl(str(exc)) from None
    if not 1 <= len(value) <= 100:
        raise InvalidControl("a job type name is 1 to 100 characters")
    return value


def pause(conn: Connection, who: Who, *, kind: str, value: str) -> tuple[Pause, int]:
    """Pause a queue, a type or an org: nothing of it is placed or claimed until resumed; jobs
    running finish. Returns the pause and how many queued jobs it holds."""
    who = who.checked()
    value = _pause_target(kind, value)
    repo.lock_placer(conn)
    done = repo.pause(conn, kind=kind, value=value, actor=who.actor, reason=who.reason)
    if done is None:
        raise ControlConflict(f"{kind} {value} is already paused")
    repo.record_event(
        conn, action="paused", scope={kind: value}, actor=who.actor, reason=who.reason
    )
    return done


def hold_stragglers(conn: Connection, *, kind: str, value: str) -> int:
    """After `pause` committed: hold what a submit placed meanwhile, having read the pauses
    before the pause committed (see `repository.limits.hold_paused`)."""
    repo.lock_placer(conn)
    return repo.hold_paused(conn, kind=kind, value=_pause_target(kind, value))


def resume(conn: Connection, who: Who, *, kind: str, value: str) -> Pause:
    """Lift a pause: its jobs go back to the placer and the workers wake at once (NOTIFY)."""
    who = who.checked()
    value = _pause_target(kind, value)
    repo.lock_placer(conn)
    lifted = repo.resume(conn, kind=kind, value=value)
    if lifted is None:
        raise ControlNotFound(f"{kind} {value} is not paused")
    repo.record_event(
        conn, action="resumed", scope={kind: value}, actor=who.actor, reason=who.reason
    )
    return lifted


list_limits = repo.list_limits
list_pauses = repo.list_pauses
list_events = repo.list_events
reconcile = repo.reconcile
lock_placer = repo.lock_placer
