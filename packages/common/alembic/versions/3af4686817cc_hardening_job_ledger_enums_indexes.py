"""hardening: job ledger enums/indexes/idempotency

Revision ID: 3af4686817cc
Revises: 001_job_ledger_init

Upgrades every database the 001 schema admits, keeping what it changes:
- rows that break the new status/finished_at rule (terminal without `finished_at`, queued or
  running with a stale one), legacy status names, and error codes/messages longer than their
  new columns are normalised; each such row gets a `job_event` (`migration.normalized`) holding
  the original values, so nothing is lost;
- a status value nobody can map stops the upgrade before anything changes.

Online (heimdex_db.online): no writer waits on more than a catalog change.
`status`, `last_error_code` and `last_error_message` change type, which would rewrite `job`
under ACCESS EXCLUSIVE; instead each gets a new column of the new type (`*_new`), a trigger
fills it for rows written meanwhile, a batched backfill (committed batch by batch, resumable)
normalises the existing rows into it, the CHECKs are added NOT VALID and validated without
blocking writers, the indexes are built CONCURRENTLY, and one short transaction under
lock_timeout swaps the columns (drop old, rename new: catalog only). Rows written by the
application during the upgrade must already satisfy the new rules (they are checked by the
NOT VALID constraints, as they would be after the upgrade).

Every step is safe to run again: an upgrade killed anywhere continues on the next run.
Offline (`--sql`, the Supabase artifact 0002) it is the transactional revision as first
published, unchanged: see `_upgrade_in_one_transaction`.
The downgrade is the plain transactional one (a rewrite under ACCESS EXCLUSIVE).
"""

from __future__ import annotations

from alembic import context, op
from sqlalchemy import text

from heimdex_db.online import (
    backfill,
    create_index,
    ddl,
    not_valid_constraint,
    online,
    set_lock_timeout,
    validate_constraint,
)

revision = "3af4686817cc"
down_revision = "001_job_ledger_init"
branch_labels = None
depends_on = None

STATUSES = ("queued", "running", "succeeded", "failed", "canceled", "dead_letter")
TERMINAL = ("succeeded", "failed", "canceled", "dead_letter")
LEGACY_NAMES = {"pending": "queued", "processing": "running", "completed": "succeeded"}
BACKOFF = ("none", "fixed", "exp")
CODE_MAX, MESSAGE_MAX = 64, 2048

CONSISTENCY = (
    f"(status IN ({', '.join(repr(s) for s in TERMINAL)}) AND finished_at IS NOT NULL)"
    " OR (status IN ('queued', 'running') AND finished_at IS NULL)"
)

# Index and constraint renames: the definition is unchanged, only the name follows the
# project's convention.
RENAMES = (
    ("INDEX", "uq_job_org_idempotency", "idx_job__org_id_idempotency_key"),
    ("INDEX", "idx_job_event_job_ts", "idx_job_event__job_id_ts"),
    ("INDEX", "idx_job_event_ts", "idx_job_event__ts"),
)
FK_OLD, FK_NEW = "fk_job_event_job_id", "fk_job_event__job_id__job"


def _quoted(values: tuple[str, ...] | list[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _mapped(column: str) -> str:
    whens = " ".join(f"WHEN '{old}' THEN '{new}'" for old, new in LEGACY_NAMES.items())
    return f"CASE {column} {whens} ELSE {column} END"


def _refuse_unknown_statuses() -> None:
    known = _quoted([*STATUSES, *LEGACY_NAMES])
    op.execute(f"""
DO $check$
DECLARE
    unknown text;
BEGIN
    SELECT string_agg(quote_literal(status) || ' (' || n || ' rows)', ', ' ORDER BY status)
      INTO unknown
      FROM (SELECT status, count(*) AS n FROM job
             WHERE status NOT IN ({known}) GROUP BY status) AS s;
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION USING
            MESSAGE = 'job holds status values 3af4686817cc cannot map: ' || unknown,
            HINT = 'set them to one of {", ".join(STATUSES)} and upgrade again; '
                   'nothing was changed';
    END IF;
END
$check$""")


# The columns whose type changes, and their new-typed twins filled before the swap.
SWAPPED = (
    ("status", "status_new"),
    ("last_error_code", "last_error_code_new"),
    ("last_error_message", "last_error_message_new"),
)
CONSISTENCY_CHECK = "ck_job__status_finished_at_consistency"
NOT_NULL_CHECK = "ck_job__status_new_not_null"
MIRROR = "job__3af4686817cc_mirror"


def _swapped() -> bool:
    """Online: true once a previous run swapped the columns (status is already the enum)."""
    if op.get_context().as_sql:
        return False
    udt = (
        op.get_bind()
        .execute(
            text(
                "SELECT udt_name FROM information_schema.columns"
                " WHERE table_schema = 'public' AND table_name = 'job' AND column_name = 'status'"
            )
        )
        .scalar()
    )
    return udt == "job_status"


def _create_types() -> list[str]:
    return [
        f"IF to_regtype('public.{name}') IS NULL THEN\n"
        f"        CREATE TYPE {name} AS ENUM ({_quoted(values)});\n    END IF"
        for name, values in (("job_status", STATUSES), ("job_backoff_policy", BACKOFF))
    ]


def _mirror_trigger() -> list[str]:
    """Rows the application writes during the upgrade get their new columns from the old ones.

    An UPDATE of a row the backfill has not reached yet leaves it to the backfill (which
    normalises it and writes its event); the backfill's own UPDATE is such an update.
    """
    mapped = _mapped("NEW.status")
    return [
        f"""CREATE OR REPLACE FUNCTION {MIRROR}() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.status_new := ({mapped})::job_status;
        NEW.last_error_code_new := NEW.last_error_code;
        NEW.last_error_message_new := NEW.last_error_message;
    ELSIF OLD.status_new IS NOT NULL THEN
        IF NEW.status IS DISTINCT FROM OLD.status THEN
            NEW.status_new := ({mapped})::job_status;
        END IF;
        IF NEW.last_error_code IS DISTINCT FROM OLD.last_error_code THEN
            NEW.last_error_code_new := NEW.last_error_code;
        END IF;
        IF NEW.last_error_message IS DISTINCT FROM OLD.last_error_message THEN
            NEW.last_error_message_new := NEW.last_error_message;
        END IF;
    END IF;
    RETURN NEW;
END
$fn$""",
        f"CREATE OR REPLACE TRIGGER {MIRROR} BEFORE INSERT ON job"
        f" FOR EACH ROW EXECUTE FUNCTION {MIRROR}()",
        # The WHEN spares the backfill's own updates a function call per row.
        f"CREATE OR REPLACE TRIGGER {MIRROR}_update BEFORE UPDATE ON job"
        f" FOR EACH ROW WHEN (OLD.status_new IS NOT NULL) EXECUTE FUNCTION {MIRROR}()",
    ]


def _normalized(row: str = "") -> dict[str, str]:
    """The new value of each backfilled column, computed from the row's old values.

    `row` qualifies the old columns (e.g. "b." for the batch CTE); unqualified, the expressions
    read the row being updated.
    """
    new_status = _mapped(f"{row}status")
    return {
        "status_new": f"({new_status})::job_status",
        "finished_at": f"CASE WHEN {new_status} IN ({_quoted(TERMINAL)})"
        f" THEN coalesce({row}finished_at, {row}updated_at, {row}started_at, {row}created_at)"
        " END",
        "last_error_code_new": f"left({row}last_error_code, {CODE_MAX})",
        "last_error_message_new": f"left({row}last_error_message, {MESSAGE_MAX})",
    }


def _normalize_set() -> str:
    """A batch's rows whose values stay as they are: fill the new columns from the row itself."""
    return ",\n    ".join(f"{column} = {value}" for column, value in _normalized().items())


def _changes() -> str:
    """True for a row whose values the normalisation changes (it gets a `job_event`)."""
    new = _normalized()
    return (
        f"status IS DISTINCT FROM ({_mapped('status')})"
        f" OR finished_at IS DISTINCT FROM ({new['finished_at']})"
        f" OR length(last_error_code) > {CODE_MAX}"
        f" OR length(last_error_message) > {MESSAGE_MAX}"
    )


def _normalize_steps() -> str:
    """A batch's rows that change: fill the new columns (normalised), log the original values."""
    sets = ",\n           ".join(
        f"{column} = {value}" for column, value in _normalized("b.").items()
    )
    return f"""fixed AS (
    UPDATE job AS j
       SET {sets}
      FROM batch AS b
     WHERE j.id = b.id
 RETURNING j.id, j.status_new::text AS new_status, j.finished_at AS new_finished_at,
           b.status AS old_status, b.finished_at AS old_finished_at,
           b.last_error_code AS old_code, b.last_error_message AS old_message
), logged AS (
INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
SELECT id, clock_timestamp(), old_status, new_status,
       jsonb_build_object(
           'action', 'migration.normalized',
           'revision', '3af4686817cc',
           'original',
           CASE WHEN old_status IS DISTINCT FROM new_status
                THEN jsonb_build_object('status', old_status) ELSE '{{}}'::jsonb END
        || CASE WHEN old_finished_at IS DISTINCT FROM new_finished_at
                THEN jsonb_build_object('finished_at', old_finished_at) ELSE '{{}}'::jsonb END
        || CASE WHEN length(old_code) > {CODE_MAX}
                THEN jsonb_build_object('last_error_code', old_code) ELSE '{{}}'::jsonb END
        || CASE WHEN length(old_message) > {MESSAGE_MAX}
                THEN jsonb_build_object('last_error_message', old_message) ELSE '{{}}'::jsonb END)
  FROM fixed
 WHERE old_status IS DISTINCT FROM new_status
    OR old_finished_at IS DISTINCT FROM new_finished_at
    OR length(old_code) > {CODE_MAX}
    OR length(old_message) > {MESSAGE_MAX}
)"""


def _swap() -> str:
    """Old columns out, new ones in: catalog changes only, in one short transaction."""
    copy_comments = "\n".join(
        f"        EXECUTE 'COMMENT ON COLUMN job.{new} IS ' || quote_nullable(col_description("
        f"'job'::regclass, (SELECT attnum FROM pg_attribute WHERE attrelid = 'job'::regclass"
        f" AND attname = '{old}')));"
        for old, new in SWAPPED
    )
    renames = "\n".join(
        f"        ALTER TABLE job RENAME COLUMN {new} TO {old};" for old, new in SWAPPED
    )
    return f"""IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'job'::regclass
                  AND attname = 'status_new' AND NOT attisdropped) THEN
        LOCK TABLE job IN ACCESS EXCLUSIVE MODE;
        DROP TRIGGER IF EXISTS {MIRROR} ON job;
        DROP TRIGGER IF EXISTS {MIRROR}_update ON job;
{copy_comments}
        ALTER TABLE job
            DROP CONSTRAINT IF EXISTS ck_job_status,
            DROP COLUMN status,
            DROP COLUMN last_error_code,
            DROP COLUMN last_error_message;
        -- SET NOT NULL skips its scan: the validated CHECK proves it (then goes).
        ALTER TABLE job ALTER COLUMN status_new SET NOT NULL;
        ALTER TABLE job DROP CONSTRAINT {NOT_NULL_CHECK};
        ALTER TABLE job ALTER COLUMN status_new SET DEFAULT 'queued';
{renames}
        DROP FUNCTION IF EXISTS {MIRROR}();
    END IF"""


def _renames() -> list[str]:
    statements = [
        f"IF to_regclass('public.{old}') IS NOT NULL THEN\n"
        f"        ALTER {kind} {old} RENAME TO {new};\n    END IF"
        for kind, old, new in RENAMES
    ]
    statements.append(
        f"IF EXISTS (SELECT 1 FROM pg_constraint WHERE conname = '{FK_OLD}') THEN\n"
        f"        ALTER TABLE job_event RENAME CONSTRAINT {FK_OLD} TO {FK_NEW};\n    END IF"
    )
    return statements


def _normalize_rows_in_place() -> None:
    new_status = _mapped("j.status")
    terminal = _quoted(TERMINAL)
    legacy = _quoted(list(LEGACY_NAMES))
    needs_finished = f"{_mapped('status')} IN ({terminal}) AND finished_at IS NULL"
    stale_finished = f"{_mapped('status')} IN ('queued', 'running') AND finished_at IS NOT NULL"
    # heimdex-lint: ignore[backfill-in-one-statement] offline artifact only, applied by new
    # projects with an empty or small job table; live databases take the batched backfill
    op.execute(f"""
WITH bad AS (
    SELECT id, status, finished_at, last_error_code, last_error_message
      FROM job
     WHERE status IN ({legacy})
        OR ({needs_finished})
        OR ({stale_finished})
        OR length(last_error_code) > {CODE_MAX}
        OR length(last_error_message) > {MESSAGE_MAX}
       FOR UPDATE
), fixed AS (
    UPDATE job AS j
       SET status = {new_status},
           finished_at = CASE
               WHEN {new_status} IN ({terminal})
               THEN coalesce(j.finished_at, j.updated_at, j.started_at, j.created_at)
           END,
           last_error_code = left(j.last_error_code, {CODE_MAX}),
           last_error_message = left(j.last_error_message, {MESSAGE_MAX})
      FROM bad
     WHERE j.id = bad.id
 RETURNING j.id, j.status AS new_status, j.finished_at AS new_finished_at,
           bad.status AS old_status, bad.finished_at AS old_finished_at,
           bad.last_error_code AS old_code, bad.last_error_message AS old_message
)
INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
SELECT id, clock_timestamp(), old_status, new_status,
       jsonb_build_object(
           'action', 'migration.normalized',
           'revision', '3af4686817cc',
           'original',
           CASE WHEN old_status IS DISTINCT FROM new_status
                THEN jsonb_build_object('status', old_status) ELSE '{{}}'::jsonb END
        || CASE WHEN old_finished_at IS DISTINCT FROM new_finished_at
                THEN jsonb_build_object('finished_at', old_finished_at) ELSE '{{}}'::jsonb END
        || CASE WHEN length(old_code) > {CODE_MAX}
                THEN jsonb_build_object('last_error_code', old_code) ELSE '{{}}'::jsonb END
        || CASE WHEN length(old_message) > {MESSAGE_MAX}
                THEN jsonb_build_object('last_error_message', old_message) ELSE '{{}}'::jsonb END)
  FROM fixed""")


def _upgrade_in_one_transaction() -> None:
    """The offline form (`alembic ... --sql`, the Supabase artifact): the revision as first
    published, one transaction. An artifact of a published revision is applied only by a
    project that has not applied it yet, a new one with an empty or small table, so it stays
    byte for byte what those projects were given and every later artifact keeps its number.
    Live databases are upgraded online by `heimdex db upgrade`."""
    op.execute("SET LOCAL lock_timeout = '5s'")
    _refuse_unknown_statuses()
    op.execute(f"CREATE TYPE job_status AS ENUM ({_quoted(STATUSES)})")
    op.execute(f"CREATE TYPE job_backoff_policy AS ENUM ({_quoted(BACKOFF)})")
    _normalize_rows_in_place()

    # Indexes on `status` would be rebuilt by the rewrite below only to be dropped: drop first.
    # The rewrite holds ACCESS EXCLUSIVE on job for the whole transaction, so a concurrent drop
    # (impossible in a transaction anyway) would not shorten any lock.
    # heimdex-lint: ignore[require-concurrent-index-deletion] job is locked by the rewrite
    op.drop_index(op.f("idx_job_org_status"), table_name="job")
    # heimdex-lint: ignore[require-concurrent-index-deletion] job is locked by the rewrite
    op.drop_index(op.f("idx_job_type_status"), table_name="job")
    # One statement, one table rewrite; the CHECK is verified during that same pass.
    # (Alembic's alter_column would emit one ALTER per change, each its own rewrite.)
    # heimdex-lint: ignore[changing-column-type] the point of this revision: one rewrite
    # heimdex-lint: ignore[ban-drop-constraint] replaced by a stricter CHECK in this statement
    # heimdex-lint: ignore[ban-drop-default] set again to 'queued' in this statement
    # heimdex-lint: ignore[constraint-missing-not-valid] checked during the same rewrite
    # heimdex-lint: ignore[table-rewrite] offline artifact only (see _upgrade_in_one_transaction)
    # heimdex-lint: ignore[validation-under-lock] offline artifact only, as above
    op.execute(f"""
ALTER TABLE job
    DROP CONSTRAINT IF EXISTS ck_job_status,
    ALTER COLUMN status DROP DEFAULT,
    ALTER COLUMN status TYPE job_status USING status::job_status,
    ALTER COLUMN status SET DEFAULT 'queued',
    ALTER COLUMN last_error_code TYPE varchar({CODE_MAX}),
    ALTER COLUMN last_error_message TYPE varchar({MESSAGE_MAX}),
    ADD COLUMN max_attempts integer DEFAULT 5 NOT NULL,
    ADD COLUMN backoff_policy job_backoff_policy DEFAULT 'exp' NOT NULL,
    ADD CONSTRAINT ck_job__status_finished_at_consistency CHECK ({CONSISTENCY})""")
    op.execute(
        "COMMENT ON COLUMN job.max_attempts IS 'Maximum retry attempts before dead-lettering'"
    )
    op.execute("COMMENT ON COLUMN job.backoff_policy IS 'Backoff policy for retry scheduling'")
    # Index and constraint names are not referenced by clients (no hints, no ON CONFLICT ON
    # CONSTRAINT); the ledger repository maps errors by the new index name.
    for kind, old, new in RENAMES:
        # heimdex-lint: ignore[renaming-object] names only, unused by clients
        op.execute(f"ALTER {kind} {old} RENAME TO {new}")
    # heimdex-lint: ignore[renaming-object] names only, unused by clients
    op.execute(f"ALTER TABLE job_event RENAME CONSTRAINT {FK_OLD} TO {FK_NEW}")
    # Not CONCURRENTLY: job is rewritten under ACCESS EXCLUSIVE in this same transaction, so a
    # concurrent build could not shorten the lock (and cannot run in a transaction at all).
    # heimdex-lint: ignore[index-not-concurrent] job is locked by the rewrite above
    op.execute("CREATE INDEX idx_job__org_id_created_at_desc ON job (org_id, created_at DESC)")
    # heimdex-lint: ignore[index-not-concurrent] job is locked by the rewrite above
    op.execute("CREATE INDEX idx_job__status_created_at ON job (status, created_at)")


# Set in the Alembic config's attributes to run the transactional form against a live database
# (bench/migration_hardening.py measures it beside the online one).
TRANSACTIONAL_ATTRIBUTE = "heimdex.3af4686817cc.transactional"


def upgrade() -> None:
    if context.is_offline_mode() or context.config.attributes.get(TRANSACTIONAL_ATTRIBUTE):
        _upgrade_in_one_transaction()
        return
    set_lock_timeout()
    swapped = _swapped()
    if not swapped:
        _refuse_unknown_statuses()
    with online():
        if not swapped:
            # Types, nullable columns and constant defaults: catalog only, no rewrite, no scan.
            # The CHECKs hold for every row written from now on (a row the backfill has not
            # reached has a NULL status_new, which passes both); VALIDATE proves the rest.
            ddl(
                [
                    *_create_types(),
                    "ALTER TABLE job"
                    " ADD COLUMN IF NOT EXISTS status_new job_status,"
                    f" ADD COLUMN IF NOT EXISTS last_error_code_new varchar({CODE_MAX}),"
                    f" ADD COLUMN IF NOT EXISTS last_error_message_new varchar({MESSAGE_MAX}),"
                    " ADD COLUMN IF NOT EXISTS max_attempts integer DEFAULT 5 NOT NULL,"
                    " ADD COLUMN IF NOT EXISTS backoff_policy job_backoff_policy"
                    " DEFAULT 'exp' NOT NULL",
                    not_valid_constraint(
                        "job",
                        CONSISTENCY_CHECK,
                        f"CHECK ({CONSISTENCY.replace('status', 'status_new')})",
                    ),
                    not_valid_constraint("job", NOT_NULL_CHECK, "CHECK (status_new IS NOT NULL)"),
                    *_mirror_trigger(),
                ],
                label="job: new columns, NOT VALID checks, mirror trigger",
            )
            backfill(
                "job",
                pending="status_new IS NULL",
                columns=(
                    "status",
                    "finished_at",
                    "updated_at",
                    "started_at",
                    "created_at",
                    "last_error_code",
                    "last_error_message",
                ),
                # Most rows only get their new columns (`set`, straight from the row); the
                # rows whose values change take the `steps` (locked, updated, logged).
                set=_normalize_set(),
                steps=_normalize_steps(),
                steps_where=_changes(),
                # The mirror trigger fills every row written from now on: none can become
                # pending behind the cursor (VALIDATE of the NOT NULL check would say so).
                recheck=False,
                label="normalise job rows",
            )
            validate_constraint("job", NOT_NULL_CHECK, CONSISTENCY_CHECK)
            create_index("idx_job__status_created_at", "job", "(status_new, created_at)")
        create_index("idx_job__org_id_created_at_desc", "job", "(org_id, created_at DESC)")
        # idx_job_org_status and idx_job_type_status go with the old status column.
        ddl(
            [
                _swap(),
                *_renames(),
                "COMMENT ON COLUMN job.max_attempts IS"
                " 'Maximum retry attempts before dead-lettering'",
                "COMMENT ON COLUMN job.backoff_policy IS 'Backoff policy for retry scheduling'",
            ],
            label="job: swap in the new columns, names, comments",
        )


def downgrade() -> None:
    set_lock_timeout()
    # max_attempts/backoff_policy do not exist at 001: keep non-default values in an event.
    op.execute("""
INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
SELECT id, clock_timestamp(), status::text, status::text,
       jsonb_build_object('action', 'migration.downgraded', 'revision', '3af4686817cc',
                          'dropped', jsonb_build_object('max_attempts', max_attempts,
                                                        'backoff_policy', backoff_policy))
  FROM job
 WHERE max_attempts <> 5 OR backoff_policy <> 'exp'""")
    op.execute("DROP INDEX idx_job__status_created_at")
    op.execute("DROP INDEX idx_job__org_id_created_at_desc")
    op.execute(f"ALTER TABLE job_event RENAME CONSTRAINT {FK_NEW} TO {FK_OLD}")
    for kind, old, new in reversed(RENAMES):
        op.execute(f"ALTER {kind} {new} RENAME TO {old}")
    op.execute(f"""
ALTER TABLE job
    DROP CONSTRAINT ck_job__status_finished_at_consistency,
    DROP COLUMN backoff_policy,
    DROP COLUMN max_attempts,
    ALTER COLUMN status DROP DEFAULT,
    ALTER COLUMN status TYPE varchar(50) USING status::text,
    ALTER COLUMN status SET DEFAULT 'queued',
    ALTER COLUMN last_error_code TYPE varchar(100),
    ALTER COLUMN last_error_message TYPE text,
    ADD CONSTRAINT ck_job_status CHECK (status IN ({_quoted(STATUSES)}))""")
    op.execute("CREATE INDEX idx_job_org_status ON job (org_id, status, created_at)")
    op.execute("CREATE INDEX idx_job_type_status ON job (type, status)")
    op.execute("DROP TYPE job_backoff_policy")
    op.execute("DROP TYPE job_status")
