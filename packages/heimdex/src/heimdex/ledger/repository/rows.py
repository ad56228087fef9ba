"""What the statements of every caller share: `job`'s columns and rows, JSON parameters, the
driver path of the hot statements, and the wake-up of idle workers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from sqlalchemy import Connection, Row, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.selectable import TextualSelect

from heimdex.db import rows_with_local_settings
from heimdex.models import BackoffPolicy, Job, JobEvent, JobStatus

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
    timeout_seconds: int | None
    checkpoint: dict[str, Any] | None
    queue: str
    held: bool


def record(values: Sequence[Any]) -> JobRecord:
    job = JobRecord._make(values)
    return job._replace(
        status=JobStatus(job.status), backoff_policy=BackoffPolicy(job.backoff_policy)
    )


JOB_COLUMNS = ", ".join(f"j.{c.name}" for c in JOB.columns)


def typed(sql: str) -> TextualSelect:
    return text(sql).columns(*JOB.columns)


def to_json(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), default=str)


def json_array(items: list[dict[str, Any]]) -> str:
    return json.dumps(items, separators=(",", ":"), default=str)


def driver_rows(
    conn: Connection,
    sql: str,
    params: Mapping[str, Any],
    *,
    prepare: bool | None = True,
    local_settings: bool = False,
) -> list[Any]:
    """Run `sql` (psycopg placeholders) on the driver connection under `conn`, in the caller's
    transaction, as a server-side prepared statement (`prepare=None`: psycopg's default, as for
    statements run through SQLAlchemy, prepared from the fifth run on a connection). A
    connection behind a transaction pooler prepares nothing (`db.make_engine`); there a statement
    that needs the session settings (`local_settings`) carries them as SET LOCAL in its own
    message (`db.rows_with_local_settings`).

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
        if local_settings and driver.prepare_threshold is None:
            values = rows_with_local_settings(driver, sql, params)
        else:
            with driver.cursor() as cursor:
                cursor.execute(sql, params, prepare=prepare)
                values = cursor.fetchall()
    except psycopg.Error as exc:
        if driver.broken or driver.closed:
            conn.invalidate(exc)
        raise DBAPIError.instance(sql, dict(params), exc, psycopg.Error) from exc
    return values


def notify(conn: Connection) -> None:
    """Wake idle workers (delivered at the caller's commit)."""
    conn.execute(text(f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')"))
