"""job ledger init: job and job_event, carrying the pre-ledger jobs table over

Revision ID: 001_job_ledger_init
Revises:

Creates exactly the schema upstream's 001_job_ledger_init created (names included), so that
databases built by either history continue on the same path. Where upstream dropped the
pre-ledger `jobs` table, this revision imports its rows into `job` (status mapped, the whole
legacy row kept in a `job_event`), then drops it; unknown legacy statuses stop the upgrade
before anything changes. Legacy rows go to the org given by `-x legacy_org_id=UUID`
(default: the nil UUID) with job type `legacy`.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

from heimdex_db.online import set_lock_timeout

revision = "001_job_ledger_init"
down_revision = None
branch_labels = None
depends_on = None

STATUSES = ("queued", "running", "succeeded", "failed", "canceled", "dead_letter")
LEGACY_STATUS_MAP = {
    "pending": "queued",
    "processing": "running",
    "completed": "succeeded",
    "failed": "failed",
}
LEGACY_TERMINAL = ("completed", "failed")
LEGACY_JOB_TYPE = "legacy"
NIL_ORG = "00000000-0000-0000-0000-000000000000"


def _legacy_org_id() -> str:
    raw = context.get_x_argument(as_dictionary=True).get("legacy_org_id", NIL_ORG)
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise ValueError(f"-x legacy_org_id must be a UUID, got {raw!r}") from None


def _sql_list(values: tuple[str, ...] | list[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _mapped_status(column: str) -> str:
    whens = " ".join(f"WHEN '{old}' THEN '{new}'" for old, new in LEGACY_STATUS_MAP.items())
    return f"CASE {column} {whens} END"


def _import_legacy_jobs() -> None:
    # Runs in the database, not in Python, so the compiled Supabase SQL does the same.
    # No '%' anywhere: the text reaches psycopg, which would read it as a placeholder.
    org = _legacy_org_id()
    known = _sql_list(list(LEGACY_STATUS_MAP))
    op.execute(f"""
DO $legacy$
DECLARE
    unknown text;
BEGIN
    IF to_regclass('public.jobs') IS NULL THEN
        RETURN;
    END IF;
    SELECT string_agg(quote_nullable(status) || ' (' || n || ' rows)', ', ' ORDER BY status)
      INTO unknown
      FROM (SELECT status, count(*) AS n FROM public.jobs
             WHERE status IS NULL OR status NOT IN ({known}) GROUP BY status) AS s;
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION USING
            MESSAGE = 'legacy table jobs holds status values 001_job_ledger_init cannot map: '
                      || unknown,
            HINT = 'map them to pending, processing, completed or failed and upgrade again; '
                   'nothing was changed';
    END IF;
    INSERT INTO job (id, org_id, type, status, created_at, updated_at, finished_at,
                     last_error_message)
    SELECT id, '{org}'::uuid, '{LEGACY_JOB_TYPE}', {_mapped_status("status")},
           coalesce(created_at, now()), coalesce(updated_at, created_at, now()),
           CASE WHEN status IN ({_sql_list(LEGACY_TERMINAL)})
                THEN coalesce(updated_at, created_at, now()) END,
           error
      FROM public.jobs;
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT j.id, coalesce(j.updated_at, j.created_at, now()), j.status,
           {_mapped_status("j.status")},
           jsonb_build_object('action', 'migration.legacy_import',
                              'revision', '001_job_ledger_init',
                              'legacy_row', to_jsonb(j))
      FROM public.jobs AS j;
    DROP TABLE public.jobs;
END
$legacy$""")


def _restore_legacy_jobs() -> None:
    op.execute("""
DO $restore$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM job_event
                    WHERE detail_json ->> 'action' = 'migration.legacy_import') THEN
        RETURN;
    END IF;
    CREATE TABLE public.jobs (
        id uuid PRIMARY KEY,
        status varchar(20) NOT NULL,
        stage varchar(50),
        progress integer DEFAULT 0,
        result jsonb,
        error text,
        created_at timestamptz DEFAULT now(),
        updated_at timestamptz DEFAULT now()
    );
    CREATE INDEX idx_jobs_status ON public.jobs (status);
    CREATE INDEX idx_jobs_created_at ON public.jobs (created_at DESC);
    INSERT INTO public.jobs
    SELECT (jsonb_populate_record(NULL::public.jobs, detail_json -> 'legacy_row')).*
      FROM job_event
     WHERE detail_json ->> 'action' = 'migration.legacy_import';
END
$restore$""")


def upgrade() -> None:
    set_lock_timeout()
    op.create_table(
        "job",
        sa.Column(
            "id",
            postgresql.UUID(as_uuid=True),
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
            comment="Globally unique job identifier",
        ),
        sa.Column(
            "org_id",
            postgresql.UUID(as_uuid=True),
            nullable=False,
            comment="Organization/tenant identifier for RLS",
        ),
        sa.Column(
            "type",
            sa.String(length=100),
            nullable=False,
            comment="Job type discriminator (e.g., 'mock_process', 'drive_ingest')",
        ),
        sa.Column(
            "status",
            sa.String(length=50),
            server_default=sa.text("'queued'"),
            nullable=False,
            comment="Current job state",
        ),
        sa.Column(
            "attempt",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Retry attempt counter (0 = first attempt)",
        ),
        sa.Column(
            "priority",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Job priority (higher = more urgent, future use)",
        ),
        sa.Column(
            "idempotency_key",
            sa.String(length=255),
            nullable=True,
            comment="Client-provided key for deduplication",
        ),
        sa.Column(
            "requested_by",
            sa.String(length=255),
            nullable=True,
            comment="User/service that requested the job",
        ),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
            comment="Job creation timestamp",
        ),
        sa.Column(
            "updated_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
            comment="Last modification timestamp",
        ),
        sa.Column(
            "started_at",
            postgresql.TIMESTAMP(timezone=True),
            nullable=True,
            comment="When job execution started",
        ),
        sa.Column(
            "finished_at",
            postgresql.TIMESTAMP(timezone=True),
            nullable=True,
            comment="When job reached terminal state",
        ),
        sa.Column(
            "last_error_code",
            sa.String(length=100),
            nullable=True,
            comment="Error classification (e.g., 'TIMEOUT', 'VALIDATION_ERROR')",
        ),
        sa.Column(
            "last_error_message",
            sa.Text(),
            nullable=True,
            comment="Human-readable error detail",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job")),
        sa.CheckConstraint(f"status IN ({_sql_list(STATUSES)})", name=op.f("ck_job_status")),
        comment="Durable ledger for asynchronous jobs with retry and idempotency support",
    )
    op.create_index(
        op.f("uq_job_org_idempotency"),
        "job",
        ["org_id", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_index(op.f("idx_job_org_status"), "job", ["org_id", "status", "created_at"])
    op.create_index(op.f("idx_job_type_status"), "job", ["type", "status"])

    op.create_table(
        "job_event",
        sa.Column(
            "id",
            postgresql.UUID(as_uuid=True),
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
            comment="Unique event identifier",
        ),
        sa.Column(
            "job_id",
            postgresql.UUID(as_uuid=True),
            nullable=False,
            comment="Reference to parent job",
        ),
        sa.Column(
            "ts",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
            comment="Event occurrence timestamp",
        ),
        sa.Column(
            "prev_status",
            sa.String(length=50),
            nullable=True,
            comment="Status before transition (NULL for initial state)",
        ),
        sa.Column(
            "next_status",
            sa.String(length=50),
            nullable=False,
            comment="Status after transition",
        ),
        sa.Column(
            "detail_json",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=True,
            comment="Additional event metadata (stage, progress, error details)",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_event")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["job.id"], name=op.f("fk_job_event_job_id"), ondelete="CASCADE"
        ),
        comment="Immutable audit log of job state transitions",
    )
    op.create_index(op.f("idx_job_event_job_ts"), "job_event", ["job_id", "ts"])
    op.create_index(op.f("idx_job_event_ts"), "job_event", ["ts"])

    _import_legacy_jobs()


def downgrade() -> None:
    set_lock_timeout()
    _restore_legacy_jobs()
    op.drop_table("job_event")
    op.drop_table("job")
