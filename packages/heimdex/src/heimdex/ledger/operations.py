"""What an operator does to jobs of any org: retry, cancel and requeue one job or many, and the
reads behind a console (stats, failures grouped by fingerprint).

Every change writes one event per job naming the actor and the reason. A single-job action
takes the caller's connection (the caller owns the transaction); a bulk action takes an engine
and commits one batch at a time, so no transaction holds more than `batch_size` row locks and a
bulk action over 100k jobs never blocks the claim for long.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, Row

from heimdex.ledger import repository, transitions
from heimdex.ledger.errors import (
    IllegalTransition,
    JobAlreadyFinished,
    LedgerError,
    NotEligible,
)
from heimdex.ledger.repository import JobFilter, JobRow
from heimdex.ledger.states import ensure_operator_transition
from heimdex.ledger.transitions import Transition
from heimdex.models import TERMINAL_STATUSES, JobStatus

DEFAULT_BATCH_SIZE = 1000
MAX_BATCH_SIZE = 10_000
REASON_MAX = 500


class Action(StrEnum):
    RETRY = "retry"
    CANCEL = "cancel"
    REQUEUE = "requeue"


# The states each action applies to, and where it takes a job from each.
TARGETS: dict[Action, dict[JobStatus, JobStatus]] = {
    Action.RETRY: {
        JobStatus.DEAD_LETTER: JobStatus.QUEUED,
        JobStatus.FAILED: JobStatus.QUEUED,
        JobStatus.CANCELED: JobStatus.QUEUED,
    },
    Action.CANCEL: {JobStatus.QUEUED: JobStatus.CANCELED, JobStatus.RUNNING: JobStatus.CANCELED},
    Action.REQUEUE: {JobStatus.QUEUED: JobStatus.QUEUED},
}


def applies_to(action: Action) -> str:
    return ", ".join(s.value for s in TARGETS[action])


@dataclass(frozen=True)
class Operator:
    """Who acts and why; both go into every event the action writes."""

    actor: str
    reason: str | None = None

    def checked(self, action: Action) -> Operator:
        actor = self.actor.strip()
        reason = (self.reason or "").strip() or None
        if not actor or len(actor) > 255:
            raise LedgerError("the actor must be 1 to 255 characters")
        if action is Action.RETRY and reason is None:
            raise LedgerError("a retry needs a reason (it is written to each job's events)")
        if reason is not None and len(reason) > REASON_MAX:
            raise LedgerError(f"the reason must be at most {REASON_MAX} characters")
        return Operator(actor, reason)

    def detail(self) -> dict[str, Any]:
        return {"actor": self.actor, "reason": self.reason}


def _check(action: Action, job: JobRow) -> None:
    if job.status in TARGETS[action]:
        target = TARGETS[action][job.status]
        if target is not job.status:  # a requeue changes the due time, not the state
            ensure_operator_transition(job.id, job.status, target)
        return
    if action is Action.CANCEL and job.status in TERMINAL_STATUSES:
        raise JobAlreadyFinished(job.id, job.status)
    if action is Action.RETRY and job.status in TERMINAL_STATUSES:
        raise IllegalTransition(job.id, job.status, JobStatus.QUEUED)
    raise NotEligible(job.id, action.value, job.status, applies_to(action))


def _report(conn: Connection, rows: Sequence[Row[Any]]) -> None:
    # A running job's cancel is a request (running -> running): its transition is the
    # worker's, when the attempt stops. A requeue is queued -> queued: the job waits its turn
    # again.
    transitions.record(
        conn,
        (
            Transition(r.type, JobStatus(r.prev), JobStatus(r.next))
            for r in rows
            if not (r.prev == r.next == JobStatus.RUNNING.value)
        ),
    )


def operate(
    conn: Connection,
    action: Action,
    job_id: uuid.UUID,
    operator: Operator,
    *,
    from_scratch: bool = False,
) -> JobRow:
    """`action` on one job of any org, in the caller's transaction; the job as it is after.

    Refused with `NotEligible`, `IllegalTransition` (a succeeded job is never retried) or
    `JobAlreadyFinished` (cancel) when the job's state does not allow it. Asking again for
    what is already so (requeue of a due job, cancel of a job already asked to stop) changes
    nothing and writes no event.
    """
    operator = operator.checked(action)
    _check_from_scratch(action, from_scratch)
    job = repository.get_job(conn, job_id, lock=True)
    _check(action, job)
    rows = repository.operate_batch(
        conn, action.value, JobFilter(ids=(job_id,)), detail=_detail(operator, from_scratch),
        after=None, limit=1, from_scratch=from_scratch,
    )  # fmt: skip
    _report(conn, rows)
    return repository.get_job(conn, job_id)


def retry(
    conn: Connection, job_id: uuid.UUID, operator: Operator, *, from_scratch: bool = False
) -> JobRow:
    """A dead-lettered, failed or canceled job back to `queued`, due now, `attempt` 0. Its
    next attempt resumes from the job's checkpoint, or starts afresh with `from_scratch`."""
    return operate(conn, Action.RETRY, job_id, operator, from_scratch=from_scratch)


def _check_from_scratch(action: Action, from_scratch: bool) -> None:
    if from_scratch and action is not Action.RETRY:
        raise LedgerError(f"from scratch applies to a retry, not a {action.value}")


def _detail(operator: Operator, from_scratch: bool) -> dict[str, Any]:
    return {**operator.detail(), "from_scratch": True} if from_scratch else operator.detail()


def cancel(conn: Connection, job_id: uuid.UUID, operator: Operator) -> JobRow:
    """A queued job `canceled` now; a running one asked to stop at its next stage boundary."""
    return operate(conn, Action.CANCEL, job_id, operator)


def requeue_now(conn: Connection, job_id: uuid.UUID, operator: Operator) -> JobRow:
    """A queued job that waits for its `run_at` (backoff, schedule) becomes due now."""
    return operate(conn, Action.REQUEUE, job_id, operator)


def checked_filter(action: Action, f: JobFilter) -> JobFilter:
    """`f` if a bulk `action` may use it: not empty (a bulk action never means "every job"),
    and not limited to states the action does not apply to."""
    if f.is_empty():
        raise LedgerError(
            f"a bulk {action.value} needs job ids or at least one filter (state, type, org, "
            "error code, fingerprint, created range)"
        )
    if f.ids is not None and not f.ids:
        raise LedgerError(f"a bulk {action.value} was given an empty list of job ids")
    if f.statuses and not set(f.statuses) & set(TARGETS[action]):
        given = ", ".join(s.value for s in f.statuses)
        raise LedgerError(f"{action.value} applies to {applies_to(action)} jobs, not {given}")
    return f


def preview(conn: Connection, action: Action, f: JobFilter) -> int:
    """How many jobs a bulk `action` over `f` would change now: the count shown before it."""
    return repository.count_eligible(conn, action.value, checked_filter(action, f))


@dataclass(frozen=True)
class BulkResult:
    action: Action
    dry_run: bool
    jobs: int
    """Jobs changed; in a dry run, jobs that would be."""
    batches: int = 0
    job_ids: list[uuid.UUID] = field(default_factory=list, repr=False)


def bulk(
    engine: Engine,
    action: Action,
    f: JobFilter,
    operator: Operator,
    *,
    dry_run: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
    from_scratch: bool = False,
) -> BulkResult:
    """`action` on every job matching `f`, one transaction per batch of `batch_size` jobs.

    Jobs are taken in id order; a job that matches but changed state meanwhile is skipped, a
    job that starts matching behind the walk is left for the next run. `on_batch` hears the
    number of jobs of each committed batch. A dry run counts and changes nothing. A retry
    `from_scratch` drops each job's checkpoint.
    """
    f = checked_filter(action, f)
    _check_from_scratch(action, from_scratch)
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise LedgerError(f"the batch size must be 1 to {MAX_BATCH_SIZE}")
    if dry_run:  # changes nothing, so it needs no reason
        with engine.connect() as conn:
            return BulkResult(action, True, repository.count_eligible(conn, action.value, f))
    operator = operator.checked(action)
    detail = {**_detail(operator, from_scratch), "bulk": True}
    after: uuid.UUID | None = None
    ids: list[uuid.UUID] = []
    batches = 0
    while True:
        with engine.begin() as conn:
            rows = repository.operate_batch(
                conn, action.value, f, detail=detail, after=after, limit=batch_size,
                from_scratch=from_scratch,
            )  # fmt: skip
            _report(conn, rows)
        if rows:
            batches += 1
            ids.extend(r.id for r in rows)
            if on_batch is not None:
                on_batch(len(rows))
        if len(rows) < batch_size:
            return BulkResult(action, False, len(ids), batches, ids)
        after = rows[-1].id


@dataclass(frozen=True)
class Stats:
    """A picture of the ledger (or of one org's part of it) now."""

    by_status: dict[str, int]
    by_type: dict[str, dict[str, int]]
    by_org: dict[uuid.UUID, dict[str, int]]
    oldest_due: JobRow | None
    throughput: list[repository.Minute]

    @property
    def oldest_due_seconds(self) -> float:
        if self.oldest_due is None:
            return 0.0
        due: datetime = self.oldest_due.run_at
        return max(0.0, (datetime.now(UTC) - due).total_seconds())


def stats(conn: Connection, *, org_id: uuid.UUID | None = None, minutes: int = 60) -> Stats:
    """Counts by state, by type and state, by org and state; the oldest due job; attempts that
    ended per minute over the last `minutes`."""
    if not 1 <= minutes <= 24 * 60:
        raise LedgerError("minutes must be 1 to 1440")
    by_status: dict[str, int] = {s.value: 0 for s in JobStatus}
    by_type: dict[str, dict[str, int]] = {}
    by_org: dict[uuid.UUID, dict[str, int]] = {}
    for c in repository.counts(conn, org_id=org_id):
        by_status[c.status] += c.jobs
        per_type = by_type.setdefault(c.type, {})
        per_type[c.status] = per_type.get(c.status, 0) + c.jobs
        per_org = by_org.setdefault(c.org_id, {})
        per_org[c.status] = per_org.get(c.status, 0) + c.jobs
    return Stats(
        by_status=by_status,
        by_type=by_type,
        by_org=by_org,
        oldest_due=repository.oldest_due(conn, org_id=org_id),
        throughput=repository.throughput(conn, minutes=minutes, org_id=org_id),
    )


def failures(
    conn: Connection,
    *,
    statuses: Sequence[JobStatus] = (JobStatus.DEAD_LETTER,),
    org_id: uuid.UUID | None = None,
    type: str | None = None,
    limit: int = 50,
) -> list[repository.FailureGroup]:
    """Dead letters (or `statuses`) grouped by error code and fingerprint, largest first."""
    return repository.failure_groups(conn, statuses=statuses, org_id=org_id, type=type, limit=limit)
