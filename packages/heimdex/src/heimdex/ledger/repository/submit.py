"""The submit's statements (the API's submit and `service.submit`): insert jobs, read the
ones an idempotency key already holds. Both run on the driver (`rows.driver_rows`)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from heimdex.ledger.repository import scopes
from heimdex.ledger.repository.rows import (
    JOB_COLUMNS,
    NOTIFY_CHANNEL,
    JobRecord,
    driver_rows,
    json_array,
    record,
)
from heimdex.models import DEFAULT_QUEUE, BackoffPolicy


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
    timeout_seconds: int | None = None
    queue: str = DEFAULT_QUEUE


_SUBMITTED = '{"action": "submitted"}'


# Batches travel as one JSON array (`jsonb_to_recordset`): one parameter, encoded in C, instead
# of an array per column adapted value by value. Jobs due now are placed in the fair queue as
# they are inserted (see THE CLAIM, in `worker`): each (org, queue, priority) of the batch starts
# after the org's last placed turn there, never before its queue's clock, and takes turns a step
# apart (TURN_UNIT / the org's weight) in the batch's order. Jobs due later are inserted
# unplaced (`turn` NULL), and so are jobs of a capped scope or a paused queue, type or org: only
# the placer, which counts slots under lock, places those (QUEUES, CAPS, SHARES AND PAUSE).
def _insert_sql(*, source: str, start: str, turn: str, join: str) -> str:
    return f"""
WITH new AS (
    SELECT * FROM {source}{start}
), ins AS (
    INSERT INTO job AS j (org_id, type, params, request_fingerprint, priority, max_attempts,
                          backoff_policy, idempotency_key, requested_by, run_at, timeout_seconds,
                          turn, queue)
    SELECT n.org_id, n.type, n.params, n.fingerprint, n.priority, n.max_attempts,
           n.policy::job_backoff_policy, n.key, n.requested_by, coalesce(n.run_at, now()),
           n.timeout_seconds, {turn}, n.queue
      FROM new AS n{join}
    ON CONFLICT (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING {JOB_COLUMNS}
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), NULL, 'queued', '{_SUBMITTED}'::jsonb FROM ins
)
SELECT ins.* FROM ins
  LEFT JOIN (SELECT pg_notify('{NOTIFY_CHANNEL}', '')
              WHERE EXISTS (SELECT 1 FROM ins WHERE run_at <= now())) AS wake ON true
"""


_COLUMNS = """(org_id uuid, type text, params jsonb, fingerprint text, priority int,
          max_attempts int, policy text, key text, requested_by text, run_at timestamptz,
          timeout_seconds int, queue text)"""
_INSERT = _insert_sql(
    source=f"""(SELECT r.*, coalesce(r.run_at, now()) <= now() AND NOT {scopes.gated("r")} AS place
              FROM ROWS FROM (jsonb_to_recordset(CAST(%(jobs)s AS jsonb)) AS {_COLUMNS})
                   WITH ORDINALITY AS r(org_id, type, params, fingerprint, priority,
                                        max_attempts, policy, key, requested_by, run_at,
                                        timeout_seconds, queue, ord)) AS n""",
    start=f"""
), start AS MATERIALIZED (
    SELECT q.org_id, q.queue, q.priority, q.step,
           greatest(heimdex_private.job_last_turn(q.org_id, q.queue, q.priority, q.clock)
                    + q.step, q.clock) AS turn
      FROM (SELECT g.*, heimdex_private.job_queue_clock(g.queue, g.priority, c.last_value)
                          AS clock
              FROM (SELECT k.org_id, k.queue, k.priority, {scopes.step("k")} AS step
                      FROM (SELECT DISTINCT org_id, queue, priority FROM new WHERE place) AS k)
                   AS g
             CROSS JOIN job_turn_clock AS c) AS q""",
    turn="""s.turn + (row_number() OVER (PARTITION BY n.org_id, n.queue, n.priority, s.turn
                                      ORDER BY n.ord) - 1) * s.step""",
    join="""
      LEFT JOIN start AS s
        ON s.org_id = n.org_id AND s.queue = n.queue AND s.priority = n.priority AND n.place
     ORDER BY n.ord""",
)
# One job (the API's one-by-one submit, the hot path): the same turn, without the batch's
# grouping and numbering (60 us less of PostgreSQL's CPU per submit).
_INSERT_ONE = _insert_sql(
    source=f"jsonb_to_recordset(CAST(%(jobs)s AS jsonb)) AS n{_COLUMNS}",
    start="",
    turn=f"""CASE WHEN coalesce(n.run_at, now()) <= now() AND NOT {scopes.gated("n")} THEN
               (SELECT greatest(heimdex_private.job_last_turn(n.org_id, n.queue, n.priority,
                                                              q.clock)
                                + {scopes.step("n")}, q.clock)
                  FROM (SELECT heimdex_private.job_queue_clock(n.queue, n.priority, c.last_value)
                                 AS clock
                          FROM job_turn_clock AS c) AS q) END""",
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
            "timeout_seconds": j.timeout_seconds,
            "queue": j.queue,
        }
        for j in jobs
    ]
    sql = _INSERT_ONE if len(payload) == 1 else _INSERT
    values = driver_rows(conn, sql, {"jobs": json_array(payload)}, prepare=None)
    return [record(v) for v in values]


_BY_KEYS = (
    f"SELECT {JOB_COLUMNS} FROM job AS j"
    " WHERE j.org_id = %(org)s AND j.idempotency_key = ANY(CAST(%(keys)s AS text[]))"
)


def by_keys(conn: Connection, org_id: uuid.UUID, keys: Sequence[str]) -> dict[str, JobRecord]:
    """The org's jobs holding these idempotency keys, by key."""
    values = driver_rows(conn, _BY_KEYS, {"org": org_id, "keys": list(keys)}, prepare=None)
    rows = [record(v) for v in values]
    return {row.idempotency_key: row for row in rows if row.idempotency_key is not None}
