"""backfills as jobs: job_backfill

Revision ID: c9e2b4d6f8a1
Revises: f3c1a8e5b7d9

`job_backfill` holds each backfill a data revision hands to the ledger (`heimdex_db.backfills`):
the table and key it walks, the batch statement, the batch size and throttle, and its progress
(the last key done, rows and batches done). A `heimdex.backfill` job runs the batches; each
batch and its progress commit together, so a batch never runs twice. Contract revisions that
declare `requires_backfills` refuse to run until theirs are done.

A new, empty table: CREATE TABLE locks nothing another session uses. Backend only: row level
security with no policy, no grant to the Data API roles. Downgrade drops the table (the jobs
stay).
"""

from __future__ import annotations

from alembic import op

from heimdex_db.online import set_lock_timeout

revision = "c9e2b4d6f8a1"
down_revision = "f3c1a8e5b7d9"
branch_labels = None
depends_on = None
supabase_slug = "backfills"

TABLE_COMMENT = "Backfills handed to the ledger by data revisions, with their progress"
COLUMN_COMMENTS = {
    "name": "Backfill name, unique",
    "revision": "Revision that recorded the backfill",
    "table_name": "Table the batches walk",
    "key_column": "Unique column the batches walk in order",
    "batch_sql": "Statement run per batch, over the keys lo to hi (bind parameters)",
    "batch_size": "Keys per batch",
    "rows_per_second": "Throttle: pause after each batch so the rate stays under this (NULL: none)",
    "pause_factor": "Throttle: pause this many times each batch's duration (NULL: none)",
    "estimated_rows": "Rows in the table when the backfill was recorded (an estimate)",
    "rows_done": "Rows (keys) the batches done so far covered",
    "batches_done": "Batches done",
    "last_key": "Last key done, as text (NULL: none yet)",
    "paused_seconds": "Time the throttle paused, in seconds",
    "job_id": "The heimdex.backfill job (not a foreign key: retention may delete it)",
    "created_at": "When the revision recorded the backfill",
    "started_at": "When the first batch ran",
    "finished_at": "When the last batch ran (NULL: not done)",
    "updated_at": "Last progress",
}


def _comment(target: str, text: str) -> None:
    op.execute(f"COMMENT ON {target} IS '{text.replace(chr(39), chr(39) * 2)}'")


def upgrade() -> None:
    set_lock_timeout()
    op.execute("""
CREATE TABLE job_backfill (
    name varchar(100) NOT NULL,
    revision varchar(64) NOT NULL,
    table_name varchar(200) NOT NULL,
    key_column varchar(63) NOT NULL,
    batch_sql text NOT NULL,
    batch_size integer NOT NULL,
    rows_per_second double precision,
    pause_factor double precision,
    estimated_rows bigint DEFAULT 0 NOT NULL,
    rows_done bigint DEFAULT 0 NOT NULL,
    batches_done integer DEFAULT 0 NOT NULL,
    last_key text,
    paused_seconds double precision DEFAULT 0 NOT NULL,
    job_id uuid,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    started_at timestamp with time zone,
    finished_at timestamp with time zone,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT pk_job_backfill PRIMARY KEY (name),
    CONSTRAINT ck_job_backfill__batch_size_positive CHECK (batch_size > 0),
    CONSTRAINT ck_job_backfill__throttle_positive
        CHECK (coalesce(rows_per_second, 1) > 0 AND coalesce(pause_factor, 0) >= 0)
)""")
    _comment("TABLE job_backfill", TABLE_COMMENT)
    for column, comment in COLUMN_COMMENTS.items():
        _comment(f"COLUMN job_backfill.{column}", comment)
    # Backend only: no policy means no access for the API roles Supabase exposes.
    op.execute("ALTER TABLE job_backfill ENABLE ROW LEVEL SECURITY")
    op.execute("REVOKE ALL ON job_backfill FROM PUBLIC, anon, authenticated")


def downgrade() -> None:
    set_lock_timeout()
    op.execute("DROP TABLE job_backfill")
