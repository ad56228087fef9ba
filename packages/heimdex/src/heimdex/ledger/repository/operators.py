"""What operators and the API's readers run: jobs and events by id and by filter, the tenant's
cancel, the operator's bulk retry, cancel and requeue, and failures grouped by fingerprint."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, text
from sqlalchemy.sql.selectable import TextualSelect

from heimdex.ledger.errors import JobNotFound
from heimdex.ledger.repository import scopes
from heimdex.ledger.repository.rows import JOB_COLUMNS, JobRow, notify, to_json, typed
from heimdex.models import JobStatus


def get_job(
    conn: Connection, job_id: uuid.UUID, *, org_id: uuid.UUID | None = None, lock: bool = False
) -> JobRow:
    """The job; with `org_id`, another org's job is reported as not found (`JobNotFound`)."""
    sql = f"SELECT {JOB_COLUMNS} FROM job AS j WHERE j.id = :id"
    if org_id is not None:
        sql += " AND j.org_id = :org"
    if lock:
        sql += " FOR UPDATE"
    row = conn.execute(typed(sql), {"id": job_id, "org": org_id}).one_or_none()
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
    queue: str | None = None,
) -> tuple[TextualSelect, dict[str, Any]]:
    """The statement of `list_jobs` and its parameters (the EXPLAIN tests plan it)."""
    sql = f"SELECT {JOB_COLUMNS} FROM job AS j WHERE j.org_id = :org"
    params: dict[str, Any] = {"org": org_id, "limit": limit}
    if status is not None:
        sql += " AND j.status = CAST(:status AS job_status)"
        params["status"] = status.value
    if type is not None:
        sql += " AND j.type = :type"
        params["type"] = type
    if queue is not None:
        sql += " AND j.queue = :queue"
        params["queue"] = queue
    if before is not None:
        sql += " AND (j.created_at, j.id) < (:before_ts, :before_id)"
        params["before_ts"], params["before_id"] = before
    sql += " ORDER BY j.created_at DESC, j.id DESC LIMIT :limit"
    return typed(sql), params


def list_jobs(
    conn: Connection,
    *,
    org_id: uuid.UUID,
    status: JobStatus | None = None,
    type: str | None = None,
    limit: int = 50,
    before: tuple[datetime, uuid.UUID] | None = None,
    queue: str | None = None,
) -> list[JobRow]:
    """The org's jobs, newest first, after the keyset cursor `before` (created_at, id)."""
    query, params = list_jobs_query(
        org_id=org_id, status=status, type=type, limit=limit, before=before, queue=queue
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


def cancel_queued(conn: Connection, job_id: uuid.UUID, detail: Mapping[str, Any]) -> JobRow:
    """A queued job (locked by the caller) becomes `canceled`, with its event."""
    return conn.execute(
        typed(f"""
WITH upd AS (
    UPDATE job AS j SET status = 'canceled', finished_at = now(), updated_at = now()
     WHERE j.id = :id AND j.status = 'queued'
    RETURNING {JOB_COLUMNS}
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), 'queued', 'canceled', CAST(:detail AS jsonb) FROM upd
), placed AS (
    SELECT org_id, queue FROM upd WHERE turn IS NOT NULL  -- a placed job held a slot
), {scopes.release("placed")}
SELECT * FROM upd"""),
        {"id": job_id, "detail": to_json(detail)},
    ).one()


def request_cancel(conn: Connection, job_id: uuid.UUID, detail: Mapping[str, Any]) -> JobRow:
    """Flag a running job (locked by the caller) for its next stage boundary, with an event."""
    return conn.execute(
        typed(f"""
WITH upd AS (
    UPDATE job AS j SET cancel_requested = true, updated_at = now()
     WHERE j.id = :id AND j.status = 'running'
    RETURNING {JOB_COLUMNS}
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), 'running', 'running', CAST(:detail AS jsonb) FROM upd
)
SELECT * FROM upd"""),
        {"id": job_id, "detail": to_json(detail)},
    ).one()


# Cross-org reads and the operator's retry, cancel and requeue.
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
    queue: str | None = None
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
    if f.queue is not None:
        clauses.append("j.queue = :f_queue")
        params["f_queue"] = f.queue
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


def _retry_update(*, from_scratch: bool) -> str:
    # A retry resumes from the job's checkpoint; from scratch, the checkpoint goes.
    fresh = " checkpoint = NULL," if from_scratch else ""
    return f"""
    UPDATE job AS j
       SET status = 'queued', attempt = 0, run_at = now(), finished_at = NULL, turn = NULL,
           held = false,
           cancel_requested = false, stage = NULL, progress = 0,{fresh} updated_at = now()
      FROM picked WHERE j.id = picked.id
    RETURNING j.id, j.type, picked.prev, 'queued' AS next, picked.attempt"""


_OPERATOR_UPDATE = {
    "retry": _retry_update(from_scratch=False),
    "retry_from_scratch": _retry_update(from_scratch=True),
    "cancel": """
    UPDATE job AS j
       SET status = CASE WHEN picked.prev = 'queued' THEN 'canceled' ELSE 'running' END
                    ::job_status,
           finished_at = CASE WHEN picked.prev = 'queued' THEN now() END,
           cancel_requested = picked.prev = 'running', updated_at = now()
      FROM picked WHERE j.id = picked.id
    RETURNING j.id, j.type, picked.prev,
              CASE WHEN picked.prev = 'queued' THEN 'canceled' ELSE 'running' END AS next,
              picked.attempt""",
    "requeue": """
    UPDATE job AS j SET run_at = now(), turn = NULL, updated_at = now()
      FROM picked WHERE j.id = picked.id
    RETURNING j.id, j.type, picked.prev, 'queued' AS next, picked.attempt""",
}


def _update_of(action: str, from_scratch: bool) -> str:
    return "retry_from_scratch" if action == "retry" and from_scratch else action


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
    from_scratch: bool = False,
) -> list[Row[Any]]:
    """Apply `action` ("retry", "cancel", "requeue") to the next `limit` eligible jobs after id
    `after`, with one event each (`detail` plus the action's own keys); one statement.

    Rows are locked in id order (FOR UPDATE: a job that changed meanwhile is checked again and
    skipped if no longer eligible). Returns (id, type, prev, next, attempt) per job changed, by
    id. A running job's cancel is a request (`cancel_requested`, event running -> running). A
    retry keeps the job's checkpoint (the next attempt resumes) unless `from_scratch`.
    """
    clauses, params = _where(f)
    if after is not None:
        clauses.append("j.id > :after")
        params["after"] = after
    where = " AND ".join([*clauses, _ELIGIBLE[action]])
    sql = f"""
WITH picked AS (
    SELECT j.id, j.status::text AS prev, j.attempt, j.org_id, j.queue,
           j.status = 'queued' AND j.turn IS NOT NULL AS placed
      FROM job AS j
     WHERE {where}
     ORDER BY j.id
     LIMIT :limit
       FOR UPDATE
), upd AS ({_OPERATOR_UPDATE[_update_of(action, from_scratch)]}
), placed AS (
    -- a placed job held a slot; a canceled one gives it back
    SELECT p.org_id, p.queue FROM picked AS p JOIN upd AS u ON u.id = p.id
     WHERE p.placed AND u.next = 'canceled'
), {scopes.release("placed")}, ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), prev, next,
           CAST(:detail AS jsonb) || jsonb_build_object(
               'action', CASE WHEN next = 'running' THEN 'cancel_requested'
                              ELSE CAST(:event AS text) END,
               'attempts_before', attempt)
      FROM upd
)
SELECT id, type, prev, next, attempt FROM upd ORDER BY id"""
    params.update(limit=limit, detail=to_json(detail), event=_ACTION_EVENT[action])
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
    sql = f"SELECT {JOB_COLUMNS} FROM job AS j{where} ORDER BY j.created_at DESC, j.id DESC"
    return list(conn.execute(typed(sql + " LIMIT :limit"), params).all())


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
