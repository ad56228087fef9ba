"""Every statement on `job` and `job_event`. Functions take the caller's connection and never
commit: the caller decides what one transaction is (a single statement in autocommit is one).

The hot paths (submit, claim, outcome, heartbeat) are one statement each, batched over arrays
(`unnest`), with the event rows written by the same statement, so a job's row and its audit log
can never disagree and a batch costs one round trip.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, text
from sqlalchemy.sql.selectable import TextualSelect

from heimdex_common.ledger.errors import JobNotFound
from heimdex_common.models import (
    ERROR_CODE_MAX,
    ERROR_MESSAGE_MAX,
    STAGE_MAX,
    BackoffPolicy,
    Job,
    JobEvent,
    JobStatus,
)

JOB = Job.__table__
EVENT = JobEvent.__table__
NOTIFY_CHANNEL = "heimdex_jobs"
IDEMPOTENCY_INDEX = "idx_job__org_id_idempotency_key"

JobRow = Row[Any]
"""A `job` row with typed columns (status a `JobStatus`, params a dict, ...)."""

_JOB_COLUMNS = ", ".join(f"j.{c.name}" for c in JOB.columns)


def _typed(sql: str) -> TextualSelect:
    return text(sql).columns(*JOB.columns)


def _json(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), default=str)


def _json_array(items: list[dict[str, Any]]) -> str:
    return json.dumps(items, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class NewJob:
    """A job to insert, validated and fingerprinted by the service."""

    org_id: uuid.UUID
    type: str
    params: Mapping[str, Any]
    request_fingerprint: str
    priority: int = 0
    max_attempts: int = 5
    backoff_policy: BackoffPolicy = BackoffPolicy.EXP
    idempotency_key: str | None = None
    requested_by: str | None = None
    run_at: datetime | None = None


# Batches travel as one JSON array (`jsonb_to_recordset`): one parameter, encoded in C, instead
# of an array per column adapted value by value.
_INSERT = _typed(f"""
WITH new AS (
    SELECT * FROM jsonb_to_recordset(CAST(:jobs AS jsonb))
      AS n(org_id uuid, type text, params jsonb, fingerprint text, priority int,
           max_attempts int, policy text, key text, requested_by text, run_at timestamptz)
), ins AS (
    INSERT INTO job AS j (org_id, type, params, request_fingerprint, priority, max_attempts,
                          backoff_policy, idempotency_key, requested_by, run_at)
    SELECT org_id, type, params, fingerprint, priority, max_attempts,
           policy::job_backoff_policy, key, requested_by, coalesce(run_at, now())
      FROM new
    ON CONFLICT (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING {_JOB_COLUMNS}
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), NULL, 'queued', '{{"action": "submitted"}}'::jsonb FROM ins
)
SELECT ins.* FROM ins
  LEFT JOIN (SELECT pg_notify('{NOTIFY_CHANNEL}', '')
              WHERE EXISTS (SELECT 1 FROM ins WHERE run_at <= now())) AS wake ON true
""")


def insert_jobs(conn: Connection, jobs: Sequence[NewJob]) -> list[JobRow]:
    """Insert queued jobs with their `submitted` events and wake idle workers; one statement.

    A job whose idempotency key the org already used is skipped (`ON CONFLICT DO NOTHING`), so
    the rows returned are the ones created; the caller reads the others with `by_keys`.
    """
    if not jobs:
        return []
    payload = [
        {
            "org_id": str(j.org_id),
            "type": j.type,
            "params": j.params,
            "fingerprint": j.request_fingerprint,
            "priority": j.priority,
            "max_attempts": j.max_attempts,
            "policy": j.backoff_policy.value,
            "key": j.idempotency_key,
            "requested_by": j.requested_by,
            "run_at": j.run_at.isoformat() if j.run_at else None,
        }
        for j in jobs
    ]
    return list(conn.execute(_INSERT, {"jobs": _json_array(payload)}).all())


def by_keys(conn: Connection, org_id: uuid.UUID, keys: Sequence[str]) -> dict[str, JobRow]:
    """The org's jobs holding these idempotency keys, by key."""
    rows = conn.execute(
        _typed(
            f"SELECT {_JOB_COLUMNS} FROM job AS j"
            " WHERE j.org_id = :org AND j.idempotency_key = ANY(CAST(:keys AS text[]))"
        ),
        {"org": org_id, "keys": list(keys)},
    ).all()
    return {row.idempotency_key: row for row in rows}


def get_job(
    conn: Connection, job_id: uuid.UUID, *, org_id: uuid.UUID | None = None, lock: bool = False
) -> JobRow:
    """The job; with `org_id`, another org's job is reported as not found (`JobNotFound`)."""
    sql = f"SELECT {_JOB_COLUMNS} FROM job AS j WHERE j.id = :id"
    if org_id is not None:
        sql += " AND j.org_id = :org"
    if lock:
        sql += " FOR UPDATE"
    row = conn.execute(_typed(sql), {"id": job_id, "org": org_id}).one_or_none()
    if row is None:
        raise JobNotFound(job_id)
    return row


def list_jobs_query(
    *,
    org_id: uuid.UUID,
    status: JobStatus | None = None,
    type: str | None = None,
    limit: int = 50,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> tuple[TextualSelect, dict[str, Any]]:
    """The statement of `list_jobs` and its parameters (the EXPLAIN tests plan it)."""
    sql = f"SELECT {_JOB_COLUMNS} FROM job AS j WHERE j.org_id = :org"
    params: dict[str, Any] = {"org": org_id, "limit": limit}
    if status is not None:
        sql += " AND j.status = CAST(:status AS job_status)"
        params["status"] = status.value
    if type is not None:
        sql += " AND j.type = :type"
        params["type"] = type
    if before is not None:
        sql += " AND (j.created_at, j.id) < (:before_ts, :before_id)"
        params["before_ts"], params["before_id"] = before
    sql += " ORDER BY j.created_at DESC, j.id DESC LIMIT :limit"
    return _typed(sql), params


def list_jobs(
    conn: Connection,
    *,
    org_id: uuid.UUID,
    status: JobStatus | None = None,
    type: str | None = None,
    limit: int = 50,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> list[JobRow]:
    """The org's jobs, newest first, after the keyset cursor `before` (created_at, id)."""
    query, params = list_jobs_query(
        org_id=org_id, status=status, type=type, limit=limit, before=before
    )
    return list(conn.execute(query, params).all())


def list_events(conn: Connection, job_id: uuid.UUID) -> list[Row[Any]]:
    return list(
        conn.execute(
            text(
                "SELECT id, ts, prev_status, next_status, detail_json FROM job_event"
                " WHERE job_id = :id ORDER BY ts, id"
            ),
            {"id": job_id},
        ).all()
    )


# The claim. Fairness is round-robin by org within a priority: the recursive CTE walks the
# distinct orgs that have queued jobs (one index probe each, however deep their backlogs),
# each org offers its next `limit` due jobs (highest priority, then earliest due), and the
# batch takes them by priority, then by turn (every org's 1st job, then every org's 2nd, ...),
# then due time. SKIP LOCKED inside each org's probe lets concurrent claimers pass each other.
# What a worker needs of a claimed job, and no more: the claim is the hottest read.
CLAIMED_COLUMNS = (
    "id", "org_id", "type", "status", "params", "priority", "run_at", "attempt",
    "max_attempts", "backoff_policy", "lease_token", "leased_by", "stage", "cancel_requested",
)  # fmt: skip

_CLAIM = text(f"""
WITH RECURSIVE orgs AS (
    (SELECT org_id FROM job WHERE status = 'queued' ORDER BY org_id LIMIT 1)
    UNION ALL
    SELECT (SELECT j.org_id FROM job AS j
             WHERE j.status = 'queued' AND j.org_id > orgs.org_id
             ORDER BY j.org_id LIMIT 1)
      FROM orgs
     WHERE orgs.org_id IS NOT NULL
), offered AS (
    SELECT c.id, c.priority, c.run_at,
           row_number() OVER (PARTITION BY c.org_id, c.priority ORDER BY c.run_at, c.id) AS turn
      FROM orgs
     CROSS JOIN LATERAL (
        SELECT j.id, j.org_id, j.priority, j.run_at
          FROM job AS j
         WHERE j.status = 'queued' AND j.org_id = orgs.org_id AND j.run_at <= now()
         ORDER BY j.priority DESC, j.run_at
         LIMIT :limit
           FOR UPDATE SKIP LOCKED) AS c
     WHERE orgs.org_id IS NOT NULL
), picked AS (
    SELECT id FROM offered ORDER BY priority DESC, turn, run_at, id LIMIT :limit
), claimed AS (
    UPDATE job AS j
       SET status = 'running', started_at = now(), updated_at = now(),
           lease_token = gen_random_uuid(), leased_by = :worker,
           lease_expires_at = now() + make_interval(secs => :lease), heartbeat_at = now(),
           stage = NULL, progress = 0
      FROM picked
     WHERE j.id = picked.id
    RETURNING {", ".join(f"j.{c}" for c in CLAIMED_COLUMNS)}
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), 'queued', 'running',
           jsonb_build_object('action', 'claimed', 'attempt', attempt, 'worker', :worker)
      FROM claimed
)
SELECT * FROM claimed ORDER BY priority DESC, run_at
""").columns(*(JOB.c[c] for c in CLAIMED_COLUMNS))


def claim(conn: Connection, *, worker_id: str, limit: int, lease_seconds: float) -> list[JobRow]:
    """Take up to `limit` due queued jobs for `worker_id`: running, leased, `claimed` events.

    The rows carry `CLAIMED_COLUMNS` only."""
    return list(
        conn.execute(_CLAIM, {"limit": limit, "worker": worker_id, "lease": lease_seconds}).all()
    )


@dataclass(frozen=True)
class Outcome:
    """How a running attempt ends, decided by the service: the row's next values and event."""

    job_id: uuid.UUID
    lease_token: uuid.UUID | None
    status: JobStatus
    attempt: int
    detail: Mapping[str, Any]
    delay_seconds: float = 0.0
    result: Mapping[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None


_OUTCOMES = text("""
WITH t AS (
    SELECT * FROM jsonb_to_recordset(CAST(:outcomes AS jsonb))
      AS t(id uuid, token uuid, status text, attempt int, delay float8, result jsonb,
           code text, message text, detail jsonb)
), upd AS (
    UPDATE job AS j
       SET status = t.status::job_status,
           attempt = t.attempt,
           result = coalesce(t.result, j.result),
           progress = CASE WHEN t.status = 'succeeded' THEN 100 ELSE j.progress END,
           run_at = CASE WHEN t.status = 'queued'
                         THEN now() + make_interval(secs => t.delay) ELSE j.run_at END,
           finished_at = CASE WHEN t.status = 'queued' THEN NULL ELSE now() END,
           updated_at = now(),
           last_error_code = CASE WHEN t.code IS NULL AND t.message IS NULL
                                  THEN j.last_error_code ELSE t.code END,
           last_error_message = CASE WHEN t.code IS NULL AND t.message IS NULL
                                     THEN j.last_error_message ELSE t.message END,
           lease_token = NULL, leased_by = NULL, lease_expires_at = NULL
      FROM t
     WHERE j.id = t.id AND j.status = 'running' AND j.lease_token IS NOT DISTINCT FROM t.token
    RETURNING j.id, t.status, t.delay, t.detail
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), 'running', status, detail FROM upd
)
SELECT id, status, delay FROM upd
""")


def write_outcomes(conn: Connection, outcomes: Sequence[Outcome]) -> set[uuid.UUID]:
    """End running attempts still holding their lease, with their events; one statement.

    Returns the ids written; an outcome missing from it lost its lease (the reaper or a cancel
    got there first) and changed nothing. Requeued jobs due now wake idle workers.
    """
    if not outcomes:
        return set()
    payload = [
        {
            "id": str(o.job_id),
            "token": str(o.lease_token) if o.lease_token else None,
            "status": o.status.value,
            "attempt": o.attempt,
            "delay": float(o.delay_seconds),
            "result": o.result,
            "code": o.error_code[:ERROR_CODE_MAX] if o.error_code else None,
            "message": o.error_message[:ERROR_MESSAGE_MAX] if o.error_message else None,
            "detail": o.detail,
        }
        for o in outcomes
    ]
    rows = conn.execute(_OUTCOMES, {"outcomes": _json_array(payload)}).all()
    if any(r.status == JobStatus.QUEUED.value and r.delay <= 0 for r in rows):
        notify(conn)
    return {r.id for r in rows}


def notify(conn: Connection) -> None:
    """Wake idle workers (delivered at the caller's commit)."""
    conn.execute(text(f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')"))


def lock_held(conn: Connection, held: Sequence[tuple[uuid.UUID, uuid.UUID]]) -> list[JobRow]:
    """The running jobs whose lease is still held by these (job id, lease token), locked."""
    return list(
        conn.execute(
            _typed(f"""
SELECT {_JOB_COLUMNS}
  FROM job AS j
  JOIN unnest(CAST(:ids AS uuid[]), CAST(:tokens AS uuid[])) AS h(id, token)
    ON j.id = h.id AND j.lease_token = h.token
 WHERE j.status = 'running'
 ORDER BY j.id
   FOR UPDATE OF j"""),
            {"ids": [i for i, _ in held], "tokens": [t for _, t in held]},
        ).all()
    )


def lock_expired(conn: Connection, *, stale_after_seconds: float, limit: int) -> list[JobRow]:
    """Running jobs whose lease expired, locked; SKIP LOCKED keeps reapers out of each other's
    way. Rows running without a lease (from before leases) count once untouched that long."""
    return list(
        conn.execute(
            _typed(f"""
SELECT {_JOB_COLUMNS}
  FROM job AS j
 WHERE j.status = 'running'
   AND (j.lease_expires_at < now()
        OR (j.lease_expires_at IS NULL
            AND j.updated_at < now() - make_interval(secs => :stale)))
 ORDER BY j.lease_expires_at NULLS FIRST
 LIMIT :limit
   FOR UPDATE SKIP LOCKED"""),
            {"stale": stale_after_seconds, "limit": limit},
        ).all()
    )


def renew_leases(
    conn: Connection, tokens: Sequence[uuid.UUID], *, lease_seconds: float
) -> set[uuid.UUID]:
    """Extend every lease in `tokens`; one statement. Returns the tokens still held."""
    if not tokens:
        return set()
    rows = conn.execute(
        text("""
UPDATE job
   SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => :lease)
 WHERE status = 'running' AND lease_token = ANY(CAST(:tokens AS uuid[]))
RETURNING lease_token"""),
        {"tokens": list(tokens), "lease": lease_seconds},
    ).all()
    return {r.lease_token for r in rows}


_STAGE = text("""
WITH cur AS (
    SELECT id, cancel_requested FROM job
     WHERE id = :id AND lease_token = :token AND status = 'running'
       FOR UPDATE
), upd AS (
    UPDATE job AS j SET stage = :stage, progress = :progress, updated_at = now()
      FROM cur
     WHERE j.id = cur.id AND NOT cur.cancel_requested
    RETURNING j.id
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), 'running', 'running',
           jsonb_build_object('action', 'progress', 'stage', CAST(:stage AS text),
                              'progress', CAST(:progress AS int))
      FROM upd
)
SELECT cancel_requested FROM cur
""")


def record_stage(
    conn: Connection, job_id: uuid.UUID, token: uuid.UUID, *, stage: str, progress: int
) -> bool | None:
    """Record a stage boundary of a held attempt, with its event; one statement.

    Returns False when recorded, True when a cancel was requested instead (nothing recorded),
    None when the attempt no longer holds the lease.
    """
    value = conn.execute(
        _STAGE,
        {
            "id": job_id,
            "token": token,
            "stage": stage[:STAGE_MAX],
            "progress": max(0, min(100, progress)),
        },
    ).scalar_one_or_none()
    return None if value is None else bool(value)


def cancel_queued(conn: Connection, job_id: uuid.UUID, detail: Mapping[str, Any]) -> JobRow:
    """A queued job (locked by the caller) becomes `canceled`, with its event."""
    return conn.execute(
        _typed(f"""
WITH upd AS (
    UPDATE job AS j SET status = 'canceled', finished_at = now(), updated_at = now()
     WHERE j.id = :id AND j.status = 'queued'
    RETURNING {_JOB_COLUMNS}
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), 'queued', 'canceled', CAST(:detail AS jsonb) FROM upd
)
SELECT * FROM upd"""),
        {"id": job_id, "detail": _json(detail)},
    ).one()


def request_cancel(conn: Connection, job_id: uuid.UUID, detail: Mapping[str, Any]) -> JobRow:
    """Flag a running job (locked by the caller) for its next stage boundary, with an event."""
    return conn.execute(
        _typed(f"""
WITH upd AS (
    UPDATE job AS j SET cancel_requested = true, updated_at = now()
     WHERE j.id = :id AND j.status = 'running'
    RETURNING {_JOB_COLUMNS}
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), 'running', 'running', CAST(:detail AS jsonb) FROM upd
)
SELECT * FROM upd"""),
        {"id": job_id, "detail": _json(detail)},
    ).one()


@dataclass(frozen=True)
class QueueStats:
    type: str
    queued: int
    due: int
    running: int
    oldest_due_seconds: float


def queue_stats(conn: Connection) -> list[QueueStats]:
    """Per type: queued and due jobs, running jobs, and the age of the oldest due job.

    Reads only unfinished rows (the claim index and the status index), never the finished
    history, so its cost follows the backlog, not the size of the ledger.
    """
    rows = conn.execute(
        text("""
SELECT type,
       count(*) FILTER (WHERE status = 'queued') AS queued,
       count(*) FILTER (WHERE status = 'queued' AND run_at <= now()) AS due,
       count(*) FILTER (WHERE status = 'running') AS running,
       coalesce(extract(epoch FROM now() - min(run_at)
                FILTER (WHERE status = 'queued' AND run_at <= now())), 0) AS oldest
  FROM job
 WHERE status IN ('queued', 'running')
 GROUP BY type
 ORDER BY type""")
    ).all()
    return [
        QueueStats(r.type, int(r.queued), int(r.due), int(r.running), float(r.oldest)) for r in rows
    ]
