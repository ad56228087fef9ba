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

from heimdex.ledger.cron import last_fire, next_fire
from heimdex.ledger.errors import IdempotencyConflict, InvalidParams, UnknownJobType
from heimdex.ledger.registry import SYSTEM_ORG_ID, Registry
from heimdex.ledger.service import JobSpec, submit_job

logger = logging.getLogger(__name__)

__all__ = ["SYSTEM_ORG_ID", "Declared", "Fired", "fire_due", "sync_declared"]


def idempotency_key(name: str, fire_at: datetime) -> str:
    return f"schedule:{name}:{fire_at.isoformat()}"


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
