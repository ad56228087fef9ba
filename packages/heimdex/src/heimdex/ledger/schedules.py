"""Periodic schedules: each fire time of a cron expression becomes exactly one job.

A schedule is a row of `job_schedule` (an org's, by name): declared by a job type
(`register(..., schedule="*/15 * * * *")`, kept in step by every worker at start) or added per
org. Every worker's keeper calls `fire_due` now and then; there is no leader. Due rows are
locked `FOR UPDATE SKIP LOCKED`, so workers share the work rather than repeat it, and each fire
time is submitted with the idempotency key `schedule:<name>:<fire time>`: the job table's unique
key per org makes it one job whatever the workers do.

Catch-up policy: a schedule that missed fire times (every worker down, the schedule paused)
fires once, for the latest fire time that passed, then goes on from the next one to come. It
never submits a burst for what it missed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

from heimdex.ledger.cron import check_cron, last_fire, next_fire, utc
from heimdex.ledger.errors import (
    IdempotencyConflict,
    InvalidParams,
    LedgerError,
    UnknownJobType,
)
from heimdex.ledger.registry import SYSTEM_ORG_ID, Registry
from heimdex.ledger.service import JobSpec, submit_job

logger = logging.getLogger(__name__)

__all__ = ["SYSTEM_ORG_ID", "Declared", "Fired", "fire_due", "sync_declared"]


def idempotency_key(name: str, fire_at: datetime) -> str:
    """One spelling per instant (UTC), whatever zone the session read `next_fire_at` in."""
    return f"schedule:{name}:{utc(fire_at).isoformat()}"


@dataclass(frozen=True)
class Declared:
    """A schedule a job type declares."""

    org_id: uuid.UUID
    name: str
    type: str
    cron: str
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Fired:
    org_id: uuid.UUID
    name: str
    fire_at: datetime
    job_id: uuid.UUID | None
    created: bool


def declared_schedules(registry: Registry) -> list[Declared]:
    """The schedules the registry's job types declare; each is named after its type."""
    found = []
    for name in registry.names():
        job_type = registry.get(name)
        if job_type.schedule is not None:
            found.append(
                Declared(
                    job_type.schedule_org,
                    name,
                    name,
                    job_type.schedule,
                    job_type.validate(job_type.schedule_params),
                )
            )
    return found


def _db_now(conn: Connection) -> datetime:
    now: datetime = conn.execute(text("SELECT now()")).scalar_one()
    return now


_UPSERT = text("""
INSERT INTO job_schedule (org_id, name, type, params, cron, declared, next_fire_at)
VALUES (:org_id, :name, :type, :params, :cron, true, :next_fire_at)
ON CONFLICT (org_id, name) DO UPDATE
   SET type = EXCLUDED.type, params = EXCLUDED.params, cron = EXCLUDED.cron, declared = true,
       next_fire_at = CASE WHEN job_schedule.cron = EXCLUDED.cron
                           THEN job_schedule.next_fire_at ELSE EXCLUDED.next_fire_at END,
       updated_at = now()
 WHERE (job_schedule.type, job_schedule.params, job_schedule.cron, job_schedule.declared)
       IS DISTINCT FROM (EXCLUDED.type, EXCLUDED.params, EXCLUDED.cron, true)
""").bindparams(bindparam("params", type_=JSONB))


def sync_declared(
    conn: Connection, declared: Iterable[Declared], *, now: datetime | None = None
) -> None:
    """Create or update the declared schedules' rows. A new (or re-timed) schedule first fires
    at its next fire time after `now`; an unchanged one keeps its state (paused, next fire)."""
    at = now or _db_now(conn)
    for d in declared:
        conn.execute(
            _UPSERT,
            {
                "org_id": d.org_id,
                "name": d.name,
                "type": d.type,
                "params": dict(d.params),
                "cron": d.cron,
                "next_fire_at": next_fire(d.cron, at),
            },
        )


_DUE = text("""
SELECT org_id, name, type, params, cron, next_fire_at FROM job_schedule
 WHERE NOT paused AND next_fire_at <= :now
 ORDER BY next_fire_at
 LIMIT :limit
   FOR UPDATE SKIP LOCKED
""")
_ADVANCE = text("""
UPDATE job_schedule
   SET next_fire_at = :next_fire_at,
       last_fire_at = coalesce(:fire_at, last_fire_at),
       last_job_id = coalesce(:job_id, last_job_id),
       updated_at = now()
 WHERE org_id = :org_id AND name = :name
""")


def fire_due(
    conn: Connection, registry: Registry, *, now: datetime | None = None, limit: int = 100
) -> list[Fired]:
    """Submit one job for each due schedule (its latest passed fire time: the catch-up
    policy) and move it to its next fire time after `now` (default: the database's clock).
    Rows another transaction is firing are skipped. The caller owns the transaction."""
    at = now or _db_now(conn)
    fired: list[Fired] = []
    for row in conn.execute(_DUE, {"now": at, "limit": limit}).mappings().all():
        fire_at = max(last_fire(row["cron"], at), row["next_fire_at"])
        job_id: uuid.UUID | None = None
        created = False
        try:
            submitted = submit_job(
                conn,
                registry,
                org_id=row["org_id"],
                spec=JobSpec(
                    type=row["type"],
                    params=row["params"],
                    idempotency_key=idempotency_key(row["name"], fire_at),
                ),
                requested_by=f"schedule:{row['name']}",
            )
            job_id, created = submitted.job.id, submitted.created
        except IdempotencyConflict as exc:  # the fire time's job exists, with other params
            job_id = exc.job_id
        except (UnknownJobType, InvalidParams) as exc:
            logger.warning(
                "schedule cannot submit its job",
                extra={
                    "action": "schedule.invalid",
                    "org_id": str(row["org_id"]),
                    "schedule": row["name"],
                    "error": str(exc),
                },
            )
        conn.execute(
            _ADVANCE,
            {
                "org_id": row["org_id"],
                "name": row["name"],
                "next_fire_at": next_fire(row["cron"], at),
                "fire_at": fire_at if job_id is not None else None,
                "job_id": job_id,
            },
        )
        fired.append(Fired(row["org_id"], row["name"], fire_at, job_id, created))
    return fired


# --- Per-org schedules: what `heimdex schedules` and /ops/schedules manage. ---


class ScheduleNotFound(LedgerError):
    def __init__(self, org_id: uuid.UUID, name: str) -> None:
        super().__init__(f"org {org_id} has no schedule {name!r}")


class InvalidScheduleName(LedgerError):
    def __init__(self, name: str) -> None:
        super().__init__(f"schedule name {name!r} must be 1 to 100 characters, without ':'")


class ScheduleExists(LedgerError):
    def __init__(self, org_id: uuid.UUID, name: str) -> None:
        super().__init__(
            f"org {org_id} already has a schedule {name!r}; remove it first or pick another name"
        )


@dataclass(frozen=True)
class Schedule:
    org_id: uuid.UUID
    name: str
    type: str
    params: dict[str, Any]
    cron: str
    declared: bool
    paused: bool
    next_fire_at: datetime
    last_fire_at: datetime | None
    last_job_id: uuid.UUID | None
    last_job_status: str | None


_COLUMNS = (
    "s.org_id, s.name, s.type, s.params, s.cron, s.declared, s.paused, s.next_fire_at,"
    " s.last_fire_at, s.last_job_id, j.status::text AS last_job_status"
)
_FROM = "FROM job_schedule AS s LEFT JOIN job AS j ON j.id = s.last_job_id"


def add_schedule(
    conn: Connection,
    registry: Registry,
    *,
    org_id: uuid.UUID,
    name: str,
    type: str,
    cron: str,
    params: Mapping[str, Any],
    now: datetime | None = None,
) -> Schedule:
    """A new schedule of the org; it first fires at its next fire time after `now`."""
    if not 1 <= len(name) <= 100 or ":" in name:
        raise InvalidScheduleName(name)
    check_cron(cron)
    clean = registry.validate(type, params)
    at = now or _db_now(conn)
    inserted = conn.execute(
        text("""
INSERT INTO job_schedule (org_id, name, type, params, cron, next_fire_at)
VALUES (:org_id, :name, :type, :params, :cron, :next_fire_at)
ON CONFLICT (org_id, name) DO NOTHING
RETURNING name""").bindparams(bindparam("params", type_=JSONB)),
        {
            "org_id": org_id,
            "name": name,
            "type": type,
            "params": clean,
            "cron": cron,
            "next_fire_at": next_fire(cron, at),
        },
    ).first()
    if inserted is None:
        raise ScheduleExists(org_id, name)
    return get_schedule(conn, org_id, name)


def get_schedule(conn: Connection, org_id: uuid.UUID, name: str) -> Schedule:
    row = (
        conn.execute(
            text(f"SELECT {_COLUMNS} {_FROM} WHERE s.org_id = :org_id AND s.name = :name"),
            {"org_id": org_id, "name": name},
        )
        .mappings()
        .first()
    )
    if row is None:
        raise ScheduleNotFound(org_id, name)
    return Schedule(**row)


def list_schedules(conn: Connection, org_id: uuid.UUID | None = None) -> list[Schedule]:
    """Every schedule (or the org's), by next fire time."""
    where = "WHERE s.org_id = :org_id" if org_id is not None else ""
    rows = conn.execute(
        text(f"SELECT {_COLUMNS} {_FROM} {where} ORDER BY s.next_fire_at, s.org_id, s.name"),
        {"org_id": org_id},
    ).mappings()
    return [Schedule(**row) for row in rows]


def remove_schedule(conn: Connection, org_id: uuid.UUID, name: str) -> None:
    """Delete the schedule; the jobs it submitted stay. A schedule a job type declares comes
    back at the next worker start unless the type drops it."""
    deleted = conn.execute(
        text("DELETE FROM job_schedule WHERE org_id = :org_id AND name = :name RETURNING name"),
        {"org_id": org_id, "name": name},
    ).first()
    if deleted is None:
        raise ScheduleNotFound(org_id, name)


def set_paused(
    conn: Connection, org_id: uuid.UUID, name: str, *, paused: bool, now: datetime | None = None
) -> Schedule:
    """Pause or resume. Resuming skips the fire times missed while paused: the schedule next
    fires at its first fire time after `now`."""
    at = now or _db_now(conn)
    current = get_schedule(conn, org_id, name)
    conn.execute(
        text("""
UPDATE job_schedule SET paused = :paused, updated_at = now(),
       next_fire_at = CASE WHEN paused AND NOT :paused THEN :resumed ELSE next_fire_at END
 WHERE org_id = :org_id AND name = :name"""),
        {
            "org_id": org_id,
            "name": name,
            "paused": paused,
            "resumed": next_fire(current.cron, at),
        },
    )
    return get_schedule(conn, org_id, name)
