"""Retention: finished jobs and their events are deleted once older than the policy's age.

A pass walks each finished status oldest first (`finished_at`, through the partial index
`idx_job__status_finished_at_id`) and deletes `batch_size` jobs per transaction, their events
with them by the foreign key's ON DELETE CASCADE. Each transaction is short
and runs under a `lock_timeout` of `lock_timeout_ms`: it locks only the rows it deletes (FOR
UPDATE SKIP LOCKED, so a row someone holds is left for the next pass) and takes no table lock
that a writer waits on; submits and claims touch other rows. An archive callback, when given,
receives the batch's rows in the same transaction, before the delete: if it raises, that batch
is rolled back and the pass stops, so nothing leaves the ledger unarchived.

Pacing: after each batch the pass sleeps `pause_factor` times as long as the batch took (a duty
cycle: 1.0, the default, keeps a pass busy at most half the time), leaving the disk, the WAL and
the CPU to everyone else in between. The defaults (100-job batches, paced x1) come from
bench/ledger_scale.py at 10M jobs, where a day's pass reads pages no longer in memory: beside
them a writer's longest submit was 35 ms at worst over 4 passes, against 155 ms beside
back-to-back 500-job batches and 215 ms beside paced ones (README, docs/architecture.md).

One pruner at a time: a pass holds a session advisory lock (`ADVISORY_LOCK_KEY`) on its own
connection; a pass that finds it taken returns at once (`PruneResult.skipped`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, Protocol

from sqlalchemy import Connection, Engine, Row, text

from heimdex.errors import HeimdexError
from heimdex.ledger.transitions import Transition, record
from heimdex.models import JobStatus

# The ages are configuration: the settings parse them (an unreadable age fails at startup) into
# the policy this pass walks.
from heimdex.settings import FAILED_GROUP, SUCCEEDED_GROUP, RetentionPolicy, format_age

logger = logging.getLogger(__name__)

# pg_try_advisory_lock(bigint): "heimdex retention" in the low bytes of a fixed key.
ADVISORY_LOCK_KEY = 0x48_44_58_52_45_54_4E
DEFAULT_BATCH_SIZE = 100
DEFAULT_LOCK_TIMEOUT_MS = 100
DEFAULT_PAUSE_FACTOR = 1.0


@dataclass(frozen=True)
class Target:
    """Jobs in `status` finished more than `age` ago: of `org_id`, or of every org not in
    `excluded` (the orgs with their own policy)."""

    status: JobStatus
    age: timedelta
    org_id: uuid.UUID | None
    excluded: tuple[uuid.UUID, ...]

    @property
    def label(self) -> str:
        return f"{self.status.value} older than {format_age(self.age)}" + (
            f" (org {self.org_id})" if self.org_id else ""
        )

    def where(self) -> str:
        # The status is one of four enum literals (never user input): inlined, so the partial
        # index's predicate is proven by every plan, generic ones included.
        sql = f"j.status = '{self.status.value}' AND j.finished_at < :cutoff"
        if self.org_id is not None:
            sql += " AND j.org_id = :org"
        elif self.excluded:
            sql += " AND j.org_id <> ALL(CAST(:excluded AS uuid[]))"
        return sql

    def params(self, now: datetime) -> dict[str, Any]:
        return {"cutoff": now - self.age, "org": self.org_id, "excluded": list(self.excluded)}


def targets(policy: RetentionPolicy) -> list[Target]:
    """One walk per (status, org or everyone else) that has an age, in a stable order."""
    others = tuple(sorted(policy.orgs))
    found = [
        Target(status, age, None, others)
        for status in (*SUCCEEDED_GROUP, *FAILED_GROUP)
        if (age := policy.default.for_status(status)) is not None
    ]
    for org_id in others:
        found.extend(
            Target(status, age, org_id, ())
            for status in (*SUCCEEDED_GROUP, *FAILED_GROUP)
            if (age := policy.orgs[org_id].for_status(status)) is not None
        )
    return found


class Archive(Protocol):
    """Called with each batch's rows before they are deleted, in the deleting transaction.

    `jobs` are whole `job` rows; `events` their `job_event` rows (by job, then time). Raise to
    keep the batch: the transaction rolls back and the pass stops."""

    def __call__(
        self, conn: Connection, jobs: Sequence[Row[Any]], events: Sequence[Row[Any]]
    ) -> None: ...


class JsonlArchive:
    """Appends one JSON line per job (its columns and an `events` list) to `path`, flushed and
    fsynced before the batch's delete commits. A crash between the fsync and the commit
    archives a batch twice, never not at all: readers dedupe by `id`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None

    def __call__(
        self, conn: Connection, jobs: Sequence[Row[Any]], events: Sequence[Row[Any]]
    ) -> None:
        by_job: dict[Any, list[dict[str, Any]]] = {}
        for event in events:
            by_job.setdefault(event.job_id, []).append(dict(event._mapping))
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        for job in jobs:
            line = {**job._mapping, "events": by_job.get(job.id, [])}
            self._file.write(json.dumps(line, separators=(",", ":"), default=str) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class Count:
    jobs: int = 0
    events: int = 0


@dataclass
class PruneResult:
    """What a pass did (or, dry, would do), by target label; `skipped` when another pruner
    held the lock, `complete` when nothing older than the policy is left."""

    dry_run: bool = False
    skipped: bool = False
    complete: bool = True
    batches: int = 0
    seconds: float = 0.0
    longest_batch_seconds: float = 0.0
    paused_seconds: float = 0.0
    by_target: dict[str, Count] = field(default_factory=dict)

    @property
    def jobs(self) -> int:
        return sum(c.jobs for c in self.by_target.values())

    @property
    def events(self) -> int:
        return sum(c.events for c in self.by_target.values())


class RetentionObserver(Protocol):
    def batch(self, status: JobStatus, jobs: int, events: int, seconds: float) -> None: ...

    def finished(self, result: PruneResult) -> None: ...


_LOCK = text("SELECT pg_try_advisory_lock(:key)")
_UNLOCK = text("SELECT pg_advisory_unlock(:key)")


def _victims(target: Target, limit: int) -> str:
    # Oldest first behind a keyset cursor, for an org's own target too: an unordered LIMIT
    # invites a sequential scan that rereads the dead rows of the batches before it (until
    # vacuum), and the cursor passes over the rows the pass keeps once, not once per batch.
    return (
        f"SELECT j.id, j.finished_at FROM job AS j WHERE {target.where()}"
        " AND (j.finished_at, j.id) > (:after_ts, :after_id)"
        f" ORDER BY j.finished_at, j.id LIMIT {int(limit)} FOR UPDATE SKIP LOCKED"
    )


_EVENTS = text(
    "SELECT * FROM job_event WHERE job_id = ANY(CAST(:ids AS uuid[])) ORDER BY job_id, ts, id"
)
_JOBS = text("SELECT * FROM job WHERE id = ANY(CAST(:ids AS uuid[])) ORDER BY finished_at, id")
_DELETE_EVENTS = text("DELETE FROM job_event WHERE job_id = ANY(CAST(:ids AS uuid[]))")
_COUNT_EVENTS = text("SELECT count(*) FROM job_event WHERE job_id = ANY(CAST(:ids AS uuid[]))")
_DELETE_JOBS = text("DELETE FROM job WHERE id = ANY(CAST(:ids AS uuid[])) RETURNING type")
_EPOCH = datetime.fromisoformat("0001-01-01T00:00:00+00:00")
_NIL = uuid.UUID(int=0)


def dry_run(
    conn: Connection, policy: RetentionPolicy, *, now: datetime | None = None
) -> PruneResult:
    """What a pass would delete now, counted (jobs, and their events); deletes nothing."""
    now = now or conn.execute(text("SELECT now()")).scalar_one()
    result = PruneResult(dry_run=True)
    for target in targets(policy):
        row = conn.execute(
            text(
                f"SELECT count(*) AS jobs, coalesce(sum(e.n), 0) AS events FROM job AS j"
                " CROSS JOIN LATERAL (SELECT count(*) AS n FROM job_event"
                f" WHERE job_id = j.id) AS e WHERE {target.where()}"
            ),
            target.params(now),
        ).one()
        result.by_target[target.label] = Count(int(row.jobs), int(row.events))
    return result


def prune(
    engine: Engine,
    policy: RetentionPolicy,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS,
    archive: Archive | None = None,
    cascade: bool = True,
    observer: RetentionObserver | None = None,
    budget_seconds: float | None = None,
    stop: Callable[[], bool] = lambda: False,
    pause_factor: float = DEFAULT_PAUSE_FACTOR,
) -> PruneResult:
    """Delete what the policy says is old, `batch_size` jobs per committed transaction.

    Runs on a connection of its own (each batch commits, so the caller has no transaction to
    own). Returns early, `complete=False`, once `budget_seconds` have passed or `stop()` is
    true; the next pass continues where the rows left off. A lock timeout skips the batch's
    target for this pass (someone holds what it wanted). An exception from `archive` rolls its
    batch back and propagates. With `cascade` (the default) a batch deletes its jobs and the
    foreign key's ON DELETE CASCADE takes their events (one index probe per job); without it,
    the events go first in one statement, and the cascade then probes again for nothing.
    bench/ledger_scale.py measures both: their batches are within the machine's noise of each
    other, so the one with a statement less is the default. After each full batch the
    pass sleeps `pause_factor` times the batch's duration (0: no pause), within the budget and
    waking early on `stop()`; the pauses are in `PruneResult.paused_seconds`.
    """
    if batch_size < 1:
        raise HeimdexError(f"the retention batch size must be positive, not {batch_size}")
    if pause_factor < 0:
        raise HeimdexError(f"the retention pause factor must not be negative, not {pause_factor}")
    started = time.monotonic()
    result = PruneResult()
    with engine.connect() as conn:
        if not conn.execute(_LOCK, {"key": ADVISORY_LOCK_KEY}).scalar_one():
            conn.commit()
            result.skipped = True
            logger.debug("another pruner holds the lock", extra={"action": "retention.skipped"})
            if observer is not None:
                observer.finished(result)
            return result
        conn.commit()
        try:
            _walk(
                conn,
                policy,
                result,
                batch_size=batch_size,
                lock_timeout_ms=lock_timeout_ms,
                archive=archive,
                cascade=cascade,
                observer=observer,
                deadline=None if budget_seconds is None else started + budget_seconds,
                stop=stop,
                pause_factor=pause_factor,
            )
        finally:
            conn.rollback()
            conn.execute(_UNLOCK, {"key": ADVISORY_LOCK_KEY})
            conn.commit()
            result.seconds = time.monotonic() - started
    log = logger.info if result.jobs or not result.complete else logger.debug
    log(
        "retention pass: %d jobs, %d events deleted in %d batches, %.1fs%s",
        result.jobs,
        result.events,
        result.batches,
        result.seconds,
        "" if result.complete else " (more left for the next pass)",
        extra={
            "action": "retention.done",
            "jobs": result.jobs,
            "events": result.events,
            "batches": result.batches,
            "seconds": round(result.seconds, 3),
            "complete": result.complete,
        },
    )
    if observer is not None:
        observer.finished(result)
    return result


def _walk(
    conn: Connection,
    policy: RetentionPolicy,
    result: PruneResult,
    *,
    batch_size: int,
    lock_timeout_ms: int,
    archive: Archive | None,
    cascade: bool,
    observer: RetentionObserver | None,
    deadline: float | None,
    stop: Callable[[], bool],
    pause_factor: float,
) -> None:
    now = conn.execute(text("SELECT now()")).scalar_one()
    conn.commit()
    last_log = time.monotonic()
    for target in targets(policy):
        count = result.by_target.setdefault(target.label, Count())
        params = target.params(now)
        after: tuple[datetime, uuid.UUID] = (_EPOCH, _NIL)
        while True:
            if stop() or (deadline is not None and time.monotonic() >= deadline):
                result.complete = False
                return
            batch_started = time.monotonic()
            try:
                with conn.begin():
                    conn.execute(text(f"SET LOCAL lock_timeout = '{int(lock_timeout_ms)}ms'"))
                    victims = conn.execute(
                        text(_victims(target, batch_size)),
                        {**params, "after_ts": after[0], "after_id": after[1]},
                    ).all()
                    if not victims:
                        break
                    ids = [v.id for v in victims]
                    if archive is not None:
                        jobs = conn.execute(_JOBS, {"ids": ids}).all()
                        events = conn.execute(_EVENTS, {"ids": ids}).all()
                        archive(conn, jobs, events)
                    events_deleted = (
                        conn.execute(_COUNT_EVENTS, {"ids": ids}).scalar_one()
                        if cascade
                        else conn.execute(_DELETE_EVENTS, {"ids": ids}).rowcount
                    )
                    deleted = conn.execute(_DELETE_JOBS, {"ids": ids}).scalars().all()
                    jobs_deleted = len(deleted)
                    record(conn, (Transition(t, target.status, None) for t in deleted))
            except Exception as exc:
                if getattr(getattr(exc, "orig", None), "sqlstate", None) != "55P03":
                    raise
                logger.warning(
                    "%s: lock_timeout; left for the next pass",
                    target.label,
                    extra={"action": "retention.lock_timeout", "status": target.status.value},
                )
                result.complete = False
                break
            seconds = time.monotonic() - batch_started
            after = (victims[-1].finished_at, victims[-1].id)
            count.jobs += jobs_deleted
            count.events += events_deleted
            result.batches += 1
            result.longest_batch_seconds = max(result.longest_batch_seconds, seconds)
            if observer is not None:
                observer.batch(target.status, jobs_deleted, events_deleted, seconds)
            if time.monotonic() - last_log >= 5.0:
                last_log = time.monotonic()
                logger.info(
                    "retention: %d jobs, %d events deleted so far (%s)",
                    result.jobs,
                    result.events,
                    target.label,
                    extra={
                        "action": "retention.progress",
                        "jobs": result.jobs,
                        "events": result.events,
                    },
                )
            if len(victims) < batch_size:
                break
            result.paused_seconds += _pause(seconds * pause_factor, deadline, stop)


def _pause(seconds: float, deadline: float | None, stop: Callable[[], bool]) -> float:
    """Sleep `seconds`, no later than the deadline, waking early on `stop()`; the time slept."""
    if seconds <= 0:
        return 0.0
    started = time.monotonic()
    end = started + seconds if deadline is None else min(started + seconds, deadline)
    while (left := end - time.monotonic()) > 0 and not stop():
        time.sleep(min(left, 0.05))
    return time.monotonic() - started
