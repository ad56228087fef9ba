"""Backfills as jobs: the `job_backfill` table's statements and the `heimdex.backfill` handler.

A data revision records a backfill (`heimdex_db.backfills.backfill_job`): the table and the
unique key its batches walk in order, the statement each batch runs over the keys `:lo` to
`:hi`, the batch size and the throttle. It submits one `heimdex.backfill` job, which any worker
runs. Each batch runs in one transaction with its progress (the last key done), under the
backfill row's lock: a batch commits with its progress or not at all, so an attempt that
starts again after a crash, a SIGKILL or a retry starts after the last committed batch and no
batch runs twice, even when a lost attempt still runs beside its successor.

Backfill jobs belong to the reserved system org (`SYSTEM_ORG_ID`, the nil UUID): no tenant
token names it, so tenants never see them, and operators find them under that org.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection, text

from heimdex.ledger.errors import LedgerError
from heimdex.ledger.registry import SYSTEM_ORG_ID, JobContext, PermanentJobError

BACKFILL_TYPE = "heimdex.backfill"
BACKFILL_ORG_ID = SYSTEM_ORG_ID
# A batch waits this long for a row lock the application holds, then the attempt fails and the
# job's retry policy runs it again from the last batch.
BATCH_LOCK_TIMEOUT = "5s"
# The throttle's pause is slept in slices this long, so a cancel or a shutdown is not kept
# waiting.
PAUSE_SLICE_SECONDS = 0.25
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")


class BackfillError(LedgerError):
    """A backfill that cannot run: unknown, or recorded with a table or key that is not an
    identifier."""


class BackfillParams(BaseModel):
    """The backfill's name: everything else is in its `job_backfill` row."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)


@dataclass(frozen=True)
class Progress:
    """Where one backfill stands, with its job's status."""

    name: str
    revision: str
    table_name: str
    batch_size: int
    rows_per_second: float | None
    pause_factor: float | None
    estimated_rows: int
    rows_done: int
    batches_done: int
    paused_seconds: float
    job_id: uuid.UUID | None
    job_status: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def state(self) -> str:
        """`done`, else the job's status (`queued`, `running`, `failed`, `dead_letter`,
        `canceled`), or `no job` when retention deleted it."""
        if self.done:
            return "done"
        return self.job_status or "no job"

    @property
    def percent(self) -> int:
        if self.done:
            return 100
        return min(99, self.rows_done * 100 // max(self.estimated_rows, 1))

    def describe(self) -> str:
        """One line: `job_region: 9000/20000 rows (45%), 9 batches, running (job <id>)`."""
        job = f" (job {self.job_id})" if self.job_id else ""
        return (
            f"{self.name}: {self.rows_done}/{self.estimated_rows} rows ({self.percent}%), "
            f"{self.batches_done} batches, {self.state}{job}"
        )


def check_identifier(what: str, value: str) -> str:
    """`value`, checked to be a (schema-qualified) SQL identifier."""
    if not _IDENTIFIER.match(value):
        raise BackfillError(
            f"{what} must be a plain identifier (schema.name allowed), not {value!r}",
        )
    return value


_PROGRESS = text("""
SELECT b.name, b.revision, b.table_name, b.batch_size, b.rows_per_second, b.pause_factor,
       b.estimated_rows, b.rows_done, b.batches_done, b.paused_seconds, b.job_id,
       j.status::text AS job_status, b.created_at, b.started_at, b.finished_at, b.updated_at
  FROM job_backfill b LEFT JOIN job j ON j.id = b.job_id
 WHERE (CAST(:names AS text[]) IS NULL OR b.name = ANY(CAST(:names AS text[])))
 ORDER BY b.created_at, b.name
""")


def progress(conn: Connection, names: Sequence[str] | None = None) -> list[Progress]:
    """Every backfill (or those named), oldest first; none before `job_backfill` exists."""
    if conn.execute(text("SELECT to_regclass('job_backfill')")).scalar_one() is None:
        return []
    rows = conn.execute(_PROGRESS, {"names": list(names) if names is not None else None})
    return [Progress(**row) for row in rows.mappings()]


_RECORD = text("""
INSERT INTO job_backfill (name, revision, table_name, key_column, batch_sql, batch_size,
                      rows_per_second, pause_factor, estimated_rows)
VALUES (:name, :revision, :table_name, :key_column, :batch_sql, :batch_size,
        :rows_per_second, :pause_factor, :estimated_rows)
ON CONFLICT (name) DO NOTHING
RETURNING name
""")


def estimate_rows(conn: Connection, table: str) -> int:
    """The planner's row count of `table`, or a count when it was never analyzed."""
    estimate = conn.execute(
        text("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(:t)"),
        {"t": table},
    ).scalar_one_or_none()
    if estimate is not None and estimate >= 0:
        return int(estimate)
    return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def record(
    conn: Connection,
    *,
    name: str,
    revision: str,
    table: str,
    key: str,
    batch: str,
    batch_size: int,
    rows_per_second: float | None,
    pause_factor: float | None,
) -> bool:
    """Record a backfill; False when one of this name exists (it is left as it is)."""
    values = {
        "name": name,
        "revision": revision,
        "table_name": check_identifier("table", table),
        "key_column": check_identifier("key", key),
        "batch_sql": batch,
        "batch_size": batch_size,
        "rows_per_second": rows_per_second,
        "pause_factor": pause_factor,
        "estimated_rows": estimate_rows(conn, table),
    }
    return conn.execute(_RECORD, values).first() is not None


def attach_job(conn: Connection, name: str, job_id: uuid.UUID) -> None:
    conn.execute(
        text("UPDATE job_backfill SET job_id = :job_id, updated_at = now() WHERE name = :name"),
        {"name": name, "job_id": job_id},
    )


def set_throttle(
    conn: Connection, name: str, *, rows_per_second: float | None, pause_factor: float | None
) -> bool:
    """Change a backfill's throttle (its next batch reads it); False when there is none."""
    found = conn.execute(
        text(
            "UPDATE job_backfill SET rows_per_second = :rps, pause_factor = :factor,"
            " updated_at = now() WHERE name = :name RETURNING name"
        ),
        {"name": name, "rps": rows_per_second, "factor": pause_factor},
    ).first()
    return found is not None


_LOCK = text("""
SELECT table_name, key_column, batch_sql, batch_size, rows_per_second, pause_factor,
       estimated_rows, rows_done, batches_done, last_key, finished_at, job_id
  FROM job_backfill WHERE name = :name FOR UPDATE
""")

_ADVANCE = text("""
UPDATE job_backfill
   SET last_key = coalesce(:hi, last_key), rows_done = rows_done + :rows,
       batches_done = batches_done + :batches, paused_seconds = paused_seconds + :pause,
       started_at = coalesce(started_at, now()), updated_at = now(),
       finished_at = CASE WHEN :finished THEN now() END
 WHERE name = :name
""")


def _next_keys(conn: Connection, table: str, key: str, last: str | None, size: int) -> Any:
    """(count, lo, hi) of the next `size` keys after `last`, as text."""
    after = "" if last is None else f" WHERE {key} > :last"
    return conn.execute(
        text(
            f"SELECT count(*), min(k)::text, max(k)::text FROM"
            f" (SELECT {key} AS k FROM {table}{after} ORDER BY {key} LIMIT :size) AS keys"
        ),
        {"last": last, "size": size},
    ).one()


def pause_after(
    rows: int, seconds: float, rows_per_second: float | None, factor: float | None
) -> float:
    """The throttle's pause after a batch of `rows` that took `seconds`: long enough that the
    rate stays under `rows_per_second`, and `factor` times the batch's duration."""
    by_rate = rows / rows_per_second if rows_per_second else 0.0
    by_factor = seconds * factor if factor else 0.0
    return max(by_rate, by_factor)


@dataclass(frozen=True)
class Batch:
    rows: int
    pause: float
    finished: bool
    rows_done: int
    batches_done: int
    estimated_rows: int
    last_key: str | None


def run_batch(conn: Connection, name: str, job_id: uuid.UUID | None = None) -> Batch:
    """Run the next batch of backfill `name` and record it, in the caller's transaction (which
    must commit both together). A finished backfill runs nothing. With `job_id`, only the job
    the revision submitted may run it: a `heimdex.backfill` job anyone else submits (a tenant
    through the API) fails without running a batch."""
    conn.execute(text(f"SET LOCAL lock_timeout = '{BATCH_LOCK_TIMEOUT}'"))
    row = conn.execute(_LOCK, {"name": name}).mappings().first()
    if row is None:
        raise BackfillError(f"no backfill is named {name!r}")
    if job_id is not None and row["job_id"] != job_id:
        raise BackfillError(f"backfill {name!r} is run by job {row['job_id']}, not {job_id}")
    if row["finished_at"] is not None:
        return Batch(
            0, 0.0, True, row["rows_done"], row["batches_done"], row["estimated_rows"],
            row["last_key"],
        )  # fmt: skip
    table = check_identifier("table", row["table_name"])
    key = check_identifier("key", row["key_column"])
    count, lo, hi = _next_keys(conn, table, key, row["last_key"], row["batch_size"])
    # Fewer keys than a batch: this one reaches the end, and finishes the backfill with it.
    finished = count < row["batch_size"]
    pause = 0.0
    if count:
        started = time.monotonic()
        conn.execute(text(row["batch_sql"]), {"lo": lo, "hi": hi})
        if not finished:
            pause = pause_after(
                count, time.monotonic() - started, row["rows_per_second"], row["pause_factor"]
            )
    conn.execute(
        _ADVANCE,
        {
            "name": name,
            "hi": hi,
            "rows": count,
            "batches": 1 if count else 0,
            "pause": pause,
            "finished": finished,
        },
    )
    return Batch(
        rows=count,
        pause=pause,
        finished=finished,
        rows_done=row["rows_done"] + count,
        batches_done=row["batches_done"] + (1 if count else 0),
        estimated_rows=row["estimated_rows"],
        last_key=hi if count else row["last_key"],
    )


def run(ctx: JobContext, params: BackfillParams) -> dict[str, Any]:
    """The `heimdex.backfill` handler: batches until the backfill is done, a checkpoint after
    each, the throttle's pause between them."""
    while True:
        ctx.check()
        try:
            with ctx.connect() as conn, conn.begin():
                batch = run_batch(conn, params.name, ctx.job_id)
        except BackfillError as exc:
            raise PermanentJobError("BACKFILL_INVALID", str(exc)) from None
        progress = (
            100
            if batch.finished
            else min(99, batch.rows_done * 100 // max(batch.estimated_rows, 1))
        )
        state = {
            "last_key": batch.last_key,
            "rows_done": batch.rows_done,
            "batches_done": batch.batches_done,
        }
        ctx.checkpoint(f"batch {batch.batches_done}", progress, state)
        if batch.finished:
            return state
        deadline = time.monotonic() + batch.pause
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, PAUSE_SLICE_SECONDS))
            ctx.check()
