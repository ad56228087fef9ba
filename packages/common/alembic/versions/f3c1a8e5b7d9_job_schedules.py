"""periodic schedules: job_schedule

Revision ID: f3c1a8e5b7d9
Revises: decbcd73cdc7

`job_schedule` holds each periodic schedule (an org's, by name): its cron expression, the job
it submits, whether it is paused, its next fire time and its last job. Workers fire due rows
(`FOR UPDATE SKIP LOCKED`) and submit each fire time as one job whose idempotency key names the
schedule and the fire time, so the job table's unique key makes a fire time exactly one job.

A new, empty table: CREATE TABLE and its index lock nothing another session uses. Backend only:
row level security with no policy, no grant to the Data API roles. Downgrade drops the table
(the jobs the schedules submitted stay).
"""

from __future__ import annotations

from alembic import op

from heimdex_db.online import set_lock_timeout

revision = "f3c1a8e5b7d9"
down_revision = "decbcd73cdc7"
branch_labels = None
depends_on = None
supabase_slug = "job_schedules"

TABLE_COMMENT = "Periodic schedules: each fire time becomes one job"
COLUMN_COMMENTS = {
    "org_id": "Organization the schedule's jobs belong to",
    "name": "Schedule name, unique per org",
    "type": "Job type each fire submits",
    "params": "Params of each submitted job",
    "cron": "Cron expression (five fields, UTC)",
    "declared": "Declared by a job type (workers keep it in step) rather than added per org",
    "paused": "A paused schedule does not fire; resuming skips the fire times it missed",
    "next_fire_at": "Next fire time",
    "last_fire_at": "Fire time of the last job submitted",
    "last_job_id": "Last job submitted (not a foreign key: retention may delete it)",
    "created_at": "Schedule creation timestamp",
    "updated_at": "Last modification timestamp",
}


def _comment(target: str, text: str) -> None:
    op.execute(f"COMMENT ON {target} IS '{text.replace(chr(39), chr(39) * 2)}'")


def upgrade() -> None:
    set_lock_timeout()
    op.execute("""
CREATE TABLE job_schedule (
    org_id uuid NOT NULL,
    name varchar(100) NOT NULL,
    type varchar(100) NOT NULL,
    params jsonb DEFAULT '{}'::jsonb NOT NULL,
    cron varchar(200) NOT NULL,
    declared boolean DEFAULT false NOT NULL,
    paused boolean DEFAULT false NOT NULL,
    next_fire_at timestamp with time zone NOT NULL,
    last_fire_at timestamp with time zone,
    last_job_id uuid,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT pk_job_schedule PRIMARY KEY (org_id, name)
)""")
    _comment("TABLE job_schedule", TABLE_COMMENT)
    for column, comment in COLUMN_COMMENTS.items():
        _comment(f"COLUMN job_schedule.{column}", comment)
    # job_schedule is created empty in this transaction: no concurrent build is needed.
    op.execute(
        "CREATE INDEX idx_job_schedule__next_fire_at ON job_schedule (next_fire_at) "
        "WHERE NOT paused"
    )
    # Backend only: no policy means no access for the API roles Supabase exposes.
    op.execute("ALTER TABLE job_schedule ENABLE ROW LEVEL SECURITY")
    op.execute("REVOKE ALL ON job_schedule FROM PUBLIC, anon, authenticated")


def downgrade() -> None:
    set_lock_timeout()
    op.execute("DROP TABLE job_schedule")
