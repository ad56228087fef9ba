"""Backfills as jobs, from inside a revision: hand the batches to the ledger, gate contracts.

A `data` revision records a backfill and submits its `heimdex.backfill` job; the workers run
the batches (throttled, resumable, retried: `heimdex.ledger.backfills`) while the release
serves. A `contract` revision that needs the backfilled rows declares it, and `heimdex db
upgrade` refuses to run it until the backfill is done:

    # data revision
    phase = "data"

    def upgrade() -> None:
        set_lock_timeout()
        backfill_job(
            "job_region",
            table="job",
            batch="UPDATE job SET region = 'eu' WHERE id BETWEEN :lo AND :hi AND region IS NULL",
            batch_size=5000,
            rows_per_second=20000,
        )

    # contract revision
    phase = "contract"
    requires_backfills = ("job_region",)

Recording is idempotent: a backfill of that name that exists is left as it is, and the job's
idempotency key (`backfill:<name>`, in the system org) makes its submission one job.
"""

from __future__ import annotations

import json
import sys

from alembic import op
from alembic.script import Script
from sqlalchemy import Connection, text

from heimdex.errors import HeimdexError
from heimdex.ledger import backfills, builtin, service
from heimdex.ledger.registry import Registry

REQUIRES_ATTRIBUTE = "requires_backfills"


class BackfillNotDone(HeimdexError):
    """A contract revision's backfill is not done: the revision was not run."""


def idempotency_key(name: str) -> str:
    return f"backfill:{name}"


def backfill_job(
    name: str,
    *,
    table: str,
    batch: str,
    key: str = "id",
    batch_size: int = 1000,
    rows_per_second: float | None = None,
    pause_factor: float | None = None,
    max_attempts: int = 10,
) -> None:
    """Record backfill `name` and submit its job, in the revision's transaction.

    The job walks `table` in order of the unique column `key`, `batch_size` keys at a time,
    and runs `batch` (SQL with the bind parameters `:lo` and `:hi`, the first and last key of
    the batch, inclusive) once per batch. The throttle pauses after each batch long enough to
    stay under `rows_per_second`, and `pause_factor` times the batch's duration (both may be
    changed while it runs: `heimdex db backfill throttle`). A failed batch is rolled back and
    the job retried, up to `max_attempts`, from the batch that failed.
    """
    if batch_size < 1:
        raise HeimdexError(f"backfill {name!r}: batch_size must be at least 1")
    if rows_per_second is not None and rows_per_second <= 0:
        raise HeimdexError(f"backfill {name!r}: rows_per_second must be positive")
    if pause_factor is not None and pause_factor < 0:
        raise HeimdexError(f"backfill {name!r}: pause_factor must not be negative")
    # The revision that calls: its module's `revision`.
    revision = str(sys._getframe(1).f_globals.get("revision", ""))
    try:
        backfills.check_identifier("table", table)
        backfills.check_identifier("key", key)
    except backfills.BackfillError as exc:
        raise HeimdexError(f"backfill {name!r}: {exc}") from None
    if op.get_context().as_sql:
        _offline(
            name, revision, table=table, key=key, batch=batch, batch_size=batch_size,
            rows_per_second=rows_per_second, pause_factor=pause_factor,
            max_attempts=max_attempts,
        )  # fmt: skip
        return
    conn = op.get_bind()
    try:
        created = backfills.record(
            conn,
            name=name,
            revision=revision,
            table=table,
            key=key,
            batch=batch,
            batch_size=batch_size,
            rows_per_second=rows_per_second,
            pause_factor=pause_factor,
        )
    except backfills.BackfillError as exc:
        raise HeimdexError(f"backfill {name!r}: {exc}") from None
    if not created:
        return
    submitted = service.submit_job(
        conn,
        Registry([("heimdex.ledger.builtin", builtin.jobs)]),
        org_id=backfills.BACKFILL_ORG_ID,
        spec=service.JobSpec(
            type=backfills.BACKFILL_TYPE,
            params={"name": name},
            max_attempts=max_attempts,
            idempotency_key=idempotency_key(name),
        ),
        requested_by=f"revision:{revision}" if revision else "revision",
    )
    backfills.attach_job(conn, name, submitted.job.id)


_OFFLINE_RECORD = """
INSERT INTO job_backfill (name, revision, table_name, key_column, batch_sql, batch_size,
                      rows_per_second, pause_factor, estimated_rows)
SELECT :name, :revision, :table_name, :key_column, :batch_sql, :batch_size,
       :rows_per_second, :pause_factor,
       CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint ELSE (SELECT count(*) FROM {table}) END
  FROM pg_class c WHERE c.oid = CAST(:table_name AS regclass)
ON CONFLICT (name) DO NOTHING
"""

# The job of a backfill recorded by this file (none when the backfill was there before), as
# `service.submit_job` inserts one: queued, due now, not yet placed (a worker places it).
_OFFLINE_SUBMIT = """
WITH new AS (
    INSERT INTO job (org_id, type, params, max_attempts, idempotency_key, requested_by)
    SELECT CAST(:org_id AS uuid), :type, CAST(:params AS jsonb), :max_attempts, :key,
           :requested_by
     WHERE EXISTS (SELECT 1 FROM job_backfill WHERE name = :name AND job_id IS NULL)
    ON CONFLICT (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id
), submitted AS (
    INSERT INTO job_event (job_id, prev_status, next_status, detail_json)
    SELECT id, NULL, 'queued', CAST(:event AS jsonb) FROM new
)
UPDATE job_backfill SET job_id = new.id, updated_at = now() FROM new WHERE job_backfill.name = :name
"""


def _offline(
    name: str,
    revision: str,
    *,
    table: str,
    key: str,
    batch: str,
    batch_size: int,
    rows_per_second: float | None,
    pause_factor: float | None,
    max_attempts: int,
) -> None:
    """`backfill_job` as SQL (`heimdex db sql`, the Supabase artifacts): the same rows."""
    op.execute(
        text(_OFFLINE_RECORD.format(table=table)).bindparams(
            name=name,
            revision=revision,
            table_name=table,
            key_column=key,
            batch_sql=batch,
            batch_size=batch_size,
            rows_per_second=rows_per_second,
            pause_factor=pause_factor,
        )
    )
    op.execute(
        text(_OFFLINE_SUBMIT).bindparams(
            name=name,
            org_id=str(backfills.BACKFILL_ORG_ID),
            type=backfills.BACKFILL_TYPE,
            params=json.dumps({"name": name}),
            max_attempts=max_attempts,
            key=idempotency_key(name),
            requested_by=f"revision:{revision}" if revision else "revision",
            event=json.dumps({"action": "submitted"}),
        )
    )


def required(script: Script) -> tuple[str, ...]:
    """The backfills `script` declares it needs done (`requires_backfills`)."""
    names = getattr(script.module, REQUIRES_ATTRIBUTE, ())
    if isinstance(names, str):
        return (names,)
    return tuple(str(n) for n in names)


def guard_sql(script: Script) -> str | None:
    """What the offline SQL of `script` (the Supabase artifacts) starts with when it requires
    backfills: a block that raises, in the file's transaction, unless every one is done."""
    names = required(script)
    if not names:
        return None
    listed = ", ".join("'" + n.replace("'", "''") + "'" for n in names)
    return f"""DO $backfills$
DECLARE
    missing text;
BEGIN
    SELECT string_agg(n.name || ' (' || coalesce(b.rows_done || '/' || b.estimated_rows
                      || ' rows', 'not recorded') || ')', ', ')
      INTO missing
      FROM unnest(ARRAY[{listed}]) AS n(name)
      LEFT JOIN job_backfill b ON b.name = n.name
     WHERE b.finished_at IS NULL;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION USING
            MESSAGE = 'revision {script.revision} requires backfills that are not done: '
                      || missing,
            HINT = 'wait for their heimdex.backfill jobs (heimdex db status), or run the rest '
                   'with heimdex db backfill finish NAME; nothing was changed';
    END IF;
END
$backfills$;

"""


def check_done(conn: Connection, script: Script) -> None:
    """Raise `BackfillNotDone` unless every backfill `script` requires is done."""
    names = required(script)
    if not names:
        return
    found = {p.name: p for p in backfills.progress(conn, names)}
    for name in names:
        progress = found.get(name)
        if progress is None:
            raise BackfillNotDone(
                f"revision {script.revision} requires backfill {name!r}, which no revision "
                "recorded: apply the data revision that records it first (heimdex db status "
                "lists the backfills)"
            )
        if progress.done:
            continue
        if progress.state in ("failed", "dead_letter", "canceled", "no job"):
            todo = f"it stopped ({progress.state}): fix the cause, then " + (
                f"`heimdex jobs retry {progress.job_id} --reason ...` (it goes on from its "
                "last batch) or"
                if progress.job_id and progress.state != "no job"
                else ""
            )
        else:
            todo = "a worker runs it: wait (`heimdex db status` shows it), or"
        raise BackfillNotDone(
            f"revision {script.revision} requires backfill {progress.describe()}; {todo} "
            f"run the rest now with `heimdex db backfill finish {name}`; then run "
            "`heimdex db upgrade` again"
        )
