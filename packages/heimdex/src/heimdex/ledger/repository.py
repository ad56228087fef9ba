"""Every statement on `job` and `job_event`. Functions take the caller's connection and never
commit: the caller decides what one transaction is (a single statement in autocommit is one).

The hot paths (submit, claim, outcome, heartbeat) are one statement each, batched over arrays
(`unnest`), with the event rows written by the same statement, so a job's row and its audit log
can never disagree and a batch costs one round trip.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from sqlalchemy import Connection, Row, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.selectable import TextualSelect

from heimdex.ledger.errors import JobNotFound
from heimdex.models import (
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


class JobRecord(NamedTuple):
    """A whole `job` row as the submit path returns it (`insert_jobs`, `by_keys`): read from
    the driver without SQLAlchemy's result machinery, which cost as much CPU as psycopg's own
    work for a one-job submit. Its fields are `job`'s columns in order (a test compares them)."""

    id: uuid.UUID
    org_id: uuid.UUID
    type: str
    status: JobStatus
    attempt: int
    max_attempts: int
    backoff_policy: BackoffPolicy
    priority: int
    idempotency_key: str | None
    run_at: datetime
    requested_by: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    last_error_code: str | None
    last_error_message: str | None
    params: dict[str, Any]
    request_fingerprint: str | None
    stage: str | None
    progress: int
    result: dict[str, Any] | None
    cancel_requested: bool
    lease_token: uuid.UUID | None
    leased_by: str | None
    lease_expires_at: datetime | None
    heartbeat_at: datetime | None
    turn: int | None


def _record(values: Sequence[Any]) -> JobRecord:
    job = JobRecord._make(values)
    return job._replace(
        status=JobStatus(job.status), backoff_policy=BackoffPolicy(job.backoff_policy)
    )


_JOB_COLUMNS = ", ".join(f"j.{c.name}" for c in JOB.columns)


def _typed(sql: str) -> TextualSelect:
    return text(sql).columns(*JOB.columns)


def _json(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), default=str)


def _json_array(items: list[dict[str, Any]]) -> str:
    return json.dumps(items, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class NewJob:
    """A job to insert, validated (and, when it has an idempotency key, fingerprinted) by the
    service."""

    org_id: uuid.UUID
    type: str
    params: Mapping[str, Any]
    request_fingerprint: str | None
    priority: int = 0
    max_attempts: int = 5
    backoff_policy: BackoffPolicy = BackoffPolicy.EXP
    idempotency_key: str | None = None
    requested_by: str | None = None
    run_at: datetime | None = None


# Batches travel as one JSON array (`jsonb_to_recordset`): one parameter, encoded in C, instead
# of an array per column adapted value by value. Jobs due now are placed in the fair queue as
# they are inserted (see THE CLAIM below): each (org, priority) of the batch starts after the
# org's last placed turn at that priority, never before the clock, and takes consecutive turns
# in the batch's order. Jobs due later are inserted unplaced (`turn` NULL).
_INSERT_TEMPLATE = f"""
WITH new AS (
    SELECT * FROM {{source}}{{start}}
), ins AS (
    INSERT INTO job AS j (org_id, type, params, request_fingerprint, priority, max_attempts,
                          backoff_policy, idempotency_key, requested_by, run_at, turn)
    SELECT n.org_id, n.type, n.params, n.fingerprint, n.priority, n.max_attempts,
           n.policy::job_backoff_policy, n.key, n.requested_by, coalesce(n.run_at, now()),
           {{turn}}
      FROM new AS n{{join}}
    ON CONFLICT (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING {_JOB_COLUMNS}
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), NULL, 'queued', '{{{{"action": "submitted"}}}}'::jsonb FROM ins
)
SELECT ins.* FROM ins
  LEFT JOIN (SELECT pg_notify('{NOTIFY_CHANNEL}', '')
              WHERE EXISTS (SELECT 1 FROM ins WHERE run_at <= now())) AS wake ON true
"""
_COLUMNS = """(org_id uuid, type text, params jsonb, fingerprint text, priority int,
          max_attempts int, policy text, key text, requested_by text, run_at timestamptz)"""
_INSERT = _INSERT_TEMPLATE.format(
    source=f"""ROWS FROM (jsonb_to_recordset(CAST(%(jobs)s AS jsonb))
      AS {_COLUMNS})
      WITH ORDINALITY AS n(org_id, type, params, fingerprint, priority, max_attempts, policy,
                           key, requested_by, run_at, ord)""",
    start="""
), start AS MATERIALIZED (
    SELECT g.org_id, g.priority,
           greatest(heimdex_private.job_last_turn(g.org_id, g.priority, c.last_value) + 1,
                    c.last_value) AS turn
      FROM (SELECT DISTINCT org_id, priority FROM new
             WHERE coalesce(run_at, now()) <= now()) AS g
     CROSS JOIN job_turn_clock AS c""",
    turn="""s.turn + row_number() OVER (PARTITION BY n.org_id, n.priority, s.turn ORDER BY n.ord)
             - 1""",
    join="""
      LEFT JOIN start AS s
        ON s.org_id = n.org_id AND s.priority = n.priority
       AND coalesce(n.run_at, now()) <= now()
     ORDER BY n.ord""",
)
# One job (the API's one-by-one submit, the hot path): the same turn, without the batch's
# grouping and numbering (60 us less of PostgreSQL's CPU per submit).
_INSERT_ONE = _INSERT_TEMPLATE.format(
    source=f"jsonb_to_recordset(CAST(%(jobs)s AS jsonb)) AS n{_COLUMNS}",
    start="",
    turn="""CASE WHEN coalesce(n.run_at, now()) <= now() THEN
               (SELECT greatest(heimdex_private.job_last_turn(n.org_id, n.priority, c.last_value)
                                + 1, c.last_value)
                  FROM job_turn_clock AS c) END""",
    join="",
)


def insert_jobs(conn: Connection, jobs: Sequence[NewJob]) -> list[JobRecord]:
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
    sql = _INSERT_ONE if len(payload) == 1 else _INSERT
    values = _driver_rows(conn, sql, {"jobs": _json_array(payload)}, prepare=None)
    return [_record(v) for v in values]


_BY_KEYS = (
    f"SELECT {_JOB_COLUMNS} FROM job AS j"
    " WHERE j.org_id = %(org)s AND j.idempotency_key = ANY(CAST(%(keys)s AS text[]))"
)


def by_keys(conn: Connection, org_id: uuid.UUID, keys: Sequence[str]) -> dict[str, JobRecord]:
    """The org's jobs holding these idempotency keys, by key."""
    values = _driver_rows(conn, _BY_KEYS, {"org": org_id, "keys": list(keys)}, prepare=None)
    rows = [_record(v) for v in values]
    return {row.idempotency_key: row for row in rows if row.idempotency_key is not None}


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


# THE CLAIM: a start-time fair queue. Within a priority, orgs take turns: every org's next job,
# then every org's one after (round-robin), whatever the size of each org's backlog.
# - A job is placed when it is due: it gets a `turn`, max(its org's last placed turn at that
#   priority + 1, the clock). The clock (`job_turn_clock`) is about the highest turn claimed so
#   far; the org's last turn is one probe of `idx_job__org_turn` from the top, in
#   `heimdex_private.job_last_turn()` (revision d2d60e3ca6c1 says why a function).
#   So an org's backlog takes consecutive turns from where the queue stands, and an org
#   with nothing queued starts at the clock: its new job is next, behind at most one job of
#   each other org at that turn.
# - Jobs due at submit are placed by the submit itself (`_INSERT`). Jobs that come due later
#   (scheduled, retried with backoff, requeued, and those queued before turns existed) wait
#   unplaced (`turn` NULL) and the claim places them when due: up to PLACE_MAX per claim,
#   oldest due first, the ones it does not take keep their turns (`parked`). A job is placed
#   when it comes due, not when it is queued, or a scheduled backlog would come due with turns
#   long past and run before every other org's work.
# - The claim reads one index (`idx_job__claim_order`: priority DESC, turn, run_at; placed
#   queued jobs only): the first `limit` rows no other claimer holds (`FOR UPDATE SKIP
#   LOCKED`), merged with what it placed, then advances the clock. No walk over the orgs: the
#   cost does not grow with the number of orgs with queued work (the walk it replaced read
#   each org's head twice per claim, through the index entries the org's claimed jobs left
#   there until the next vacuum).
# What it does not promise: two submits of one org racing at one priority may place jobs at
# the same turn (that org gets two in one round), and two claims racing may set the clock a
# few turns back for a moment (a newcomer then starts a little early). Neither loses a job or
# starves an org.
PLACE_MAX = 1000


class ClaimedJob(NamedTuple):
    """What a worker needs of a claimed job, and no more: the claim is the hottest read."""

    id: uuid.UUID
    org_id: uuid.UUID
    type: str
    status: JobStatus
    params: dict[str, Any]
    priority: int
    run_at: datetime
    attempt: int
    max_attempts: int
    backoff_policy: BackoffPolicy
    lease_token: uuid.UUID
    leased_by: str
    stage: str | None
    cancel_requested: bool


CLAIMED_COLUMNS = ClaimedJob._fields

_CLAIM = f"""
WITH clock AS (
    SELECT last_value AS turn FROM job_turn_clock
), due AS (
    SELECT j.id, j.org_id, j.priority, j.run_at
      FROM job AS j
     WHERE j.status = 'queued' AND j.turn IS NULL AND j.run_at <= now()
     ORDER BY j.run_at
     LIMIT {PLACE_MAX}
       FOR UPDATE SKIP LOCKED
), firsts AS MATERIALIZED (
    SELECT k.org_id, k.priority,
           greatest(heimdex_private.job_last_turn(k.org_id, k.priority, clock.turn) + 1,
                    clock.turn) AS turn
      FROM (SELECT DISTINCT org_id, priority FROM due) AS k
     CROSS JOIN clock
), placed AS (
    SELECT d.id, d.priority, d.run_at,
           f.turn + row_number() OVER (PARTITION BY d.org_id, d.priority ORDER BY d.run_at, d.id)
             - 1 AS turn
      FROM due AS d
      JOIN firsts AS f ON f.org_id = d.org_id AND f.priority = d.priority
), ready AS (
    SELECT j.id, j.priority, j.turn, j.run_at
      FROM job AS j
     WHERE j.status = 'queued' AND j.turn IS NOT NULL AND j.run_at <= now()
     ORDER BY j.priority DESC, j.turn, j.run_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), picked AS (
    SELECT c.id, c.turn
      FROM (SELECT id, priority, turn, run_at FROM ready
            UNION ALL
            SELECT id, priority, turn, run_at FROM placed) AS c
     ORDER BY c.priority DESC, c.turn, c.run_at
     LIMIT %(limit)s
), claimed AS (
    UPDATE job AS j
       SET status = 'running', started_at = now(), updated_at = now(), turn = picked.turn,
           lease_token = gen_random_uuid(), leased_by = %(worker)s,
           lease_expires_at = now() + make_interval(secs => %(lease)s), heartbeat_at = now(),
           stage = NULL, progress = 0
      FROM picked
     -- `= ANY(ARRAY(...))` as well: only the primary key answers it, whatever the plan (a
     -- generic plan, not knowing `limit`, joined `picked` to a sequential scan of `job`).
     WHERE j.id = ANY(ARRAY(SELECT id FROM picked)) AND j.id = picked.id
    RETURNING {", ".join(f"j.{c}" for c in CLAIMED_COLUMNS)}
), parked AS (
    UPDATE job AS j SET turn = placed.turn
      FROM placed
     WHERE j.id = ANY(ARRAY(SELECT id FROM placed)) AND j.id = placed.id
       AND placed.id NOT IN (SELECT id FROM picked)
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), 'queued', 'running',
           jsonb_build_object('action', 'claimed', 'attempt', attempt, 'worker', %(worker)s)
      FROM claimed
), tick AS (
    SELECT setval('job_turn_clock', m.top)
      FROM (SELECT max(turn) AS top FROM picked) AS m, clock
     WHERE m.top > clock.turn
)
SELECT {", ".join(f"claimed.{c}" for c in CLAIMED_COLUMNS)}, counts.due, counts.ticks
  -- `ticks` is returned so that the planner keeps it, and with it the clock's advance.
  FROM (SELECT (SELECT count(*) FROM due) AS due, (SELECT count(*) FROM tick) AS ticks) AS counts
  LEFT JOIN claimed ON true
 ORDER BY claimed.priority DESC, claimed.run_at
"""


def _driver_rows(
    conn: Connection, sql: str, params: Mapping[str, Any], *, prepare: bool | None = True
) -> list[Any]:
    """Run `sql` (psycopg placeholders) on the driver connection under `conn`, in the caller's
    transaction, as a server-side prepared statement (`prepare=None`: psycopg's default, as for
    statements run through SQLAlchemy, prepared from the fifth run on a connection).

    For the hot statements (submit, claim and outcomes): SQLAlchemy's per-statement work
    (compiled cache, result metadata, typed rows) was about a fifth of the worker's Python
    time per no-op job in a py-spy profile (its removal did not move the drain's throughput
    measurably: docs/architecture.md); for a one-job submit, 350 µs of client CPU through
    SQLAlchemy against 190 µs on the driver. Errors still surface as SQLAlchemy's `DBAPIError`
    family, and a broken connection is invalidated, as `conn.execute` would."""
    if not conn.in_transaction():
        # What `conn.execute` would do (autobegin): else SQLAlchemy believes no transaction is
        # open, and the caller's `conn.commit()` does nothing while the driver's stays open.
        conn.begin()
    driver: psycopg.Connection[Any] = conn.connection.driver_connection  # type: ignore[assignment]
    try:
        with driver.cursor() as cursor:
            cursor.execute(sql, params, prepare=prepare)
            values = cursor.fetchall()
    except psycopg.Error as exc:
        if driver.broken or driver.closed:
            conn.invalidate(exc)
        raise DBAPIError.instance(sql, dict(params), exc, psycopg.Error) from exc
    return values


@dataclass(frozen=True)
class Claim:
    """What one claim took, and whether due jobs were left unplaced (more than PLACE_MAX came
    due at once): then claim again at once."""

    jobs: list[ClaimedJob]
    more_due: bool


def _claimed(values: Sequence[Any]) -> ClaimedJob:
    job = ClaimedJob._make(values[:-2])
    return job._replace(
        status=JobStatus(job.status), backoff_policy=BackoffPolicy(job.backoff_policy)
    )


@functools.cache
def _claim_sql(limit: int) -> str:
    """The claim with `limit` written in: one prepared statement per batch size. As a parameter,
    the limit left PostgreSQL's plan cache without a generic plan it trusted (estimated for an
    unknown limit), so it planned the statement on every claim: 0.5 ms each, a quarter of
    PostgreSQL's CPU per job in a 200k drain."""
    return _CLAIM.replace("%(limit)s", str(int(limit)))


def claim(conn: Connection, *, worker_id: str, limit: int, lease_seconds: float) -> Claim:
    """Take up to `limit` due queued jobs for `worker_id`, in claim order (priority, then the
    orgs' turns, then due time): running, leased, `claimed` events. Places the jobs that came
    due unplaced on the way (see THE CLAIM)."""
    values = _driver_rows(conn, _claim_sql(limit), {"worker": worker_id, "lease": lease_seconds})
    jobs = [_claimed(v) for v in values if v[0] is not None]
    due = values[0][-2] if values else 0
    return Claim(jobs, more_due=due >= PLACE_MAX)


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


# KEY LOOKUPS. The statements that touch a handful of known jobs (outcomes, the rows a failure
# locks) find them by primary key and compare the status as text. Compared as an enum,
# `status = 'running'` matches the status index; when the queue has grown since the last
# ANALYZE, the planner then believes a few rows match and reads every running or queued row
# (and the dead ones) through a bitmap, then hashes them: measured, 10,950 index entries and
# 468 heap pages to update 10 jobs.
_OUTCOMES = """
WITH t AS (
    SELECT * FROM jsonb_to_recordset(CAST(%(outcomes)s AS jsonb))
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
           lease_token = NULL, leased_by = NULL, lease_expires_at = NULL,
           turn = NULL  -- a requeued job is placed again when due (THE CLAIM)
      FROM t
     WHERE j.id = ANY(%(ids)s::uuid[]) AND j.id = t.id
       AND j.status::text = 'running' AND j.lease_token IS NOT DISTINCT FROM t.token
    RETURNING j.id, t.status, t.delay, t.detail
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), 'running', status, detail FROM upd
)
SELECT id, status, delay FROM upd
"""


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
    rows = _driver_rows(
        conn, _OUTCOMES, {"outcomes": _json_array(payload), "ids": [o.job_id for o in outcomes]}
    )
    if any(status == JobStatus.QUEUED.value and delay <= 0 for _, status, delay in rows):
        notify(conn)
    return {job_id for job_id, _, _ in rows}


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
 WHERE j.id = ANY(CAST(:ids AS uuid[])) AND j.status::text = 'running'
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


# --- Operator statements: cross-org reads and the operator's retry, cancel and requeue -------
# Bulk actions walk the matching rows in id order, one batch per call, so each transaction
# locks at most `limit` rows; `after` is the last id of the previous batch.

# An error's fingerprint: its code and its message with ids and numbers masked, hashed, so the
# same failure on different jobs groups together. `fingerprint.error_fingerprint` is its twin.
ERROR_FINGERPRINT_SQL = (
    "left(md5(coalesce(j.last_error_code, '') || ':' || regexp_replace(regexp_replace("
    "coalesce(j.last_error_message, ''), "
    "'[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}', "
    "'<uuid>', 'g'), '[0-9]+', '<n>', 'g')), 12)"
)


@dataclass(frozen=True)
class JobFilter:
    """Which jobs an operator means: every given criterion must hold (ids, if given, too)."""

    ids: tuple[uuid.UUID, ...] | None = None
    statuses: tuple[JobStatus, ...] = ()
    type: str | None = None
    org_id: uuid.UUID | None = None
    error_code: str | None = None
    error_fingerprint: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None

    def is_empty(self) -> bool:
        return self == JobFilter()


def _where(f: JobFilter) -> tuple[list[str], dict[str, Any]]:
    clauses: list[str] = []
    params: dict[str, Any] = {}
    if f.ids is not None:
        clauses.append("j.id = ANY(CAST(:f_ids AS uuid[]))")
        params["f_ids"] = list(f.ids)
    if f.statuses:
        clauses.append("j.status = ANY(CAST(:f_statuses AS job_status[]))")
        params["f_statuses"] = [s.value for s in f.statuses]
    if f.type is not None:
        clauses.append("j.type = :f_type")
        params["f_type"] = f.type
    if f.org_id is not None:
        clauses.append("j.org_id = :f_org")
        params["f_org"] = f.org_id
    if f.error_code is not None:
        clauses.append("j.last_error_code = :f_code")
        params["f_code"] = f.error_code
    if f.error_fingerprint is not None:
        clauses.append(f"{ERROR_FINGERPRINT_SQL} = :f_fp")
        params["f_fp"] = f.error_fingerprint
    if f.created_after is not None:
        clauses.append("j.created_at >= :f_after")
        params["f_after"] = f.created_after
    if f.created_before is not None:
        clauses.append("j.created_at < :f_before")
        params["f_before"] = f.created_before
    return clauses, params


# What each operator action may touch; the service checks the state machine per job as well.
_ELIGIBLE = {
    "retry": "j.status IN ('dead_letter', 'failed', 'canceled')",
    "cancel": "(j.status = 'queued' OR (j.status = 'running' AND NOT j.cancel_requested))",
    "requeue": "(j.status = 'queued' AND j.run_at > now())",
}

_OPERATOR_UPDATE = {
    "retry": """
    UPDATE job AS j
       SET status = 'queued', attempt = 0, run_at = now(), finished_at = NULL, turn = NULL,
           cancel_requested = false, stage = NULL, progress = 0, updated_at = now()
      FROM picked WHERE j.id = picked.id
    RETURNING j.id, picked.prev, 'queued' AS next, picked.attempt""",
    "cancel": """
    UPDATE job AS j
       SET status = CASE WHEN picked.prev = 'queued' THEN 'canceled' ELSE 'running' END
                    ::job_status,
           finished_at = CASE WHEN picked.prev = 'queued' THEN now() END,
           cancel_requested = picked.prev = 'running', updated_at = now()
      FROM picked WHERE j.id = picked.id
    RETURNING j.id, picked.prev,
              CASE WHEN picked.prev = 'queued' THEN 'canceled' ELSE 'running' END AS next,
              picked.attempt""",
    "requeue": """
    UPDATE job AS j SET run_at = now(), turn = NULL, updated_at = now()
      FROM picked WHERE j.id = picked.id
    RETURNING j.id, picked.prev, 'queued' AS next, picked.attempt""",
}

_ACTION_EVENT = {"retry": "retried", "cancel": "canceled", "requeue": "requeued"}


def count_eligible(conn: Connection, action: str, f: JobFilter) -> int:
    """How many jobs `action` would change now (the dry run of a bulk action)."""
    clauses, params = _where(f)
    sql = "SELECT count(*) FROM job AS j WHERE " + " AND ".join([*clauses, _ELIGIBLE[action]])
    return int(conn.execute(text(sql), params).scalar_one())


def operate_batch(
    conn: Connection,
    action: str,
    f: JobFilter,
    *,
    detail: Mapping[str, Any],
    after: uuid.UUID | None,
    limit: int,
) -> list[Row[Any]]:
    """Apply `action` ("retry", "cancel", "requeue") to the next `limit` eligible jobs after id
    `after`, with one event each (`detail` plus the action's own keys); one statement.

    Rows are locked in id order (FOR UPDATE: a job that changed meanwhile is checked again and
    skipped if no longer eligible). Returns (id, prev, next, attempt) per job changed, by id.
    A running job's cancel is a request (`cancel_requested`, event running -> running).
    """
    clauses, params = _where(f)
    if after is not None:
        clauses.append("j.id > :after")
        params["after"] = after
    where = " AND ".join([*clauses, _ELIGIBLE[action]])
    sql = f"""
WITH picked AS (
    SELECT j.id, j.status::text AS prev, j.attempt FROM job AS j
     WHERE {where}
     ORDER BY j.id
     LIMIT :limit
       FOR UPDATE
), upd AS ({_OPERATOR_UPDATE[action]}
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), prev, next,
           CAST(:detail AS jsonb) || jsonb_build_object(
               'action', CASE WHEN next = 'running' THEN 'cancel_requested'
                              ELSE CAST(:event AS text) END,
               'attempts_before', attempt)
      FROM upd
)
SELECT id, prev, next, attempt FROM upd ORDER BY id"""
    params.update(limit=limit, detail=_json(detail), event=_ACTION_EVENT[action])
    rows = list(conn.execute(text(sql), params).all())
    if action != "cancel" and rows:
        notify(conn)
    return rows


def list_jobs_ops(
    conn: Connection,
    f: JobFilter,
    *,
    limit: int = 50,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> list[JobRow]:
    """Jobs of every org matching `f`, newest first, after the keyset cursor `before`."""
    clauses, params = _where(f)
    if before is not None:
        clauses.append("(j.created_at, j.id) < (:before_ts, :before_id)")
        params["before_ts"], params["before_id"] = before
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    params["limit"] = limit
    sql = f"SELECT {_JOB_COLUMNS} FROM job AS j{where} ORDER BY j.created_at DESC, j.id DESC"
    return list(conn.execute(_typed(sql + " LIMIT :limit"), params).all())


@dataclass(frozen=True)
class Counts:
    status: str
    type: str
    org_id: uuid.UUID
    jobs: int


def counts(conn: Connection, *, org_id: uuid.UUID | None = None) -> list[Counts]:
    """Jobs by (status, type, org), every org or one. Reads the whole ledger (or the org's
    part, by its index): an operator's question, not a hot path."""
    sql = "SELECT j.status::text AS status, j.type, j.org_id, count(*) AS jobs FROM job AS j"
    if org_id is not None:
        sql += " WHERE j.org_id = :org"
    sql += " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    return [
        Counts(r.status, r.type, r.org_id, int(r.jobs))
        for r in conn.execute(text(sql), {"org": org_id}).all()
    ]


def oldest_due(conn: Connection, *, org_id: uuid.UUID | None = None) -> JobRow | None:
    """The queued job that has been due longest, if any."""
    sql = f"SELECT {_JOB_COLUMNS} FROM job AS j WHERE j.status = 'queued' AND j.run_at <= now()"
    if org_id is not None:
        sql += " AND j.org_id = :org"
    sql += " ORDER BY j.run_at, j.id LIMIT 1"
    return conn.execute(_typed(sql), {"org": org_id}).one_or_none()


@dataclass(frozen=True)
class Minute:
    minutes_ago: int
    succeeded: int
    failed: int


def throughput(conn: Connection, *, minutes: int, org_id: uuid.UUID | None = None) -> list[Minute]:
    """Attempts ended per minute over the last `minutes` (0 = the current minute), read from
    the events (their `ts` index): succeeded, and failed (every attempt that ended with an
    error, retried or not). Minutes with nothing are included as zeros."""
    join = " JOIN job AS j ON j.id = e.job_id AND j.org_id = :org" if org_id else ""
    rows = conn.execute(
        text(f"""
SELECT floor(extract(epoch FROM now() - e.ts) / 60)::int AS ago,
       count(*) FILTER (WHERE e.next_status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE e.detail_json -> 'error' IS NOT NULL) AS failed
  FROM job_event AS e{join}
 WHERE e.ts > now() - make_interval(mins => :minutes)
   AND e.prev_status = 'running' AND e.next_status <> 'running'
 GROUP BY 1"""),
        {"minutes": minutes, "org": org_id},
    ).all()
    by_minute = {r.ago: r for r in rows}
    return [
        Minute(m, int(by_minute[m].succeeded), int(by_minute[m].failed))
        if m in by_minute
        else Minute(m, 0, 0)
        for m in range(minutes)
    ]


@dataclass(frozen=True)
class FailureGroup:
    error_code: str | None
    fingerprint: str
    jobs: int
    orgs: int
    types: list[str]
    sample_message: str | None
    sample_job_id: uuid.UUID
    last_failed_at: datetime | None


def failure_groups(
    conn: Connection,
    *,
    statuses: Sequence[JobStatus] = (JobStatus.DEAD_LETTER,),
    org_id: uuid.UUID | None = None,
    type: str | None = None,
    limit: int = 50,
) -> list[FailureGroup]:
    """Jobs in `statuses` grouped by (error code, error fingerprint), largest group first."""
    clauses, params = _where(JobFilter(statuses=tuple(statuses), org_id=org_id, type=type))
    rows = conn.execute(
        text(f"""
SELECT j.last_error_code AS code, {ERROR_FINGERPRINT_SQL} AS fingerprint, count(*) AS jobs,
       count(DISTINCT j.org_id) AS orgs, array_agg(DISTINCT j.type) AS types,
       (array_agg(j.last_error_message ORDER BY j.finished_at DESC, j.id))[1] AS sample,
       (array_agg(j.id ORDER BY j.finished_at DESC, j.id))[1] AS sample_id,
       max(j.finished_at) AS last_at
  FROM job AS j
 WHERE {" AND ".join(clauses)}
 GROUP BY 1, 2
 ORDER BY jobs DESC, code, fingerprint
 LIMIT :limit"""),
        {**params, "limit": limit},
    ).all()
    return [
        FailureGroup(
            r.code,
            r.fingerprint,
            int(r.jobs),
            int(r.orgs),
            sorted(r.types),
            r.sample,
            r.sample_id,
            r.last_at,
        )
        for r in rows
    ]
