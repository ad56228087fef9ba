"""long jobs: a submission's execution timeout, an attempt's checkpoint

Revision ID: e4a7c2b9d5f1
Revises: d2d60e3ca6c1

- `job.timeout_seconds` (integer, NULL: the job type's own timeout, or none): a submission may
  lower its type's timeout; the worker stops the attempt at the deadline (`TIMEOUT`).
- `job.checkpoint` (jsonb, NULL: nothing saved): the stage, progress and small JSON state the
  handler saved with `ctx.checkpoint(...)`, written by the statement that records the stage; the
  next attempt reads it from its claim and skips what is done. An operator's retry keeps it
  unless asked to start from scratch.

Cost on a live table: two nullable columns without a default, catalog only, under
lock_timeout. No row is rewritten; downgrade drops them.
"""

from __future__ import annotations

from heimdex_db.online import ddl, online, set_lock_timeout

revision = "e4a7c2b9d5f1"
down_revision = "d2d60e3ca6c1"
branch_labels = None
depends_on = None
supabase_slug = "long_jobs"

TIMEOUT_COMMENT = "Execution timeout of each attempt in seconds, lower than its job type timeout"
CHECKPOINT_COMMENT = "Stage, progress and state saved by the handler; the next attempt resumes"


def upgrade() -> None:
    set_lock_timeout()
    with online():
        ddl(
            [
                "ALTER TABLE job ADD COLUMN IF NOT EXISTS timeout_seconds integer,"
                " ADD COLUMN IF NOT EXISTS checkpoint jsonb",
                f"COMMENT ON COLUMN job.timeout_seconds IS '{TIMEOUT_COMMENT}'",
                f"COMMENT ON COLUMN job.checkpoint IS '{CHECKPOINT_COMMENT}'",
            ],
            label="add job.timeout_seconds and job.checkpoint",
        )


def downgrade() -> None:
    set_lock_timeout()
    with online():
        ddl(
            [
                "ALTER TABLE job DROP COLUMN IF EXISTS checkpoint",
                "ALTER TABLE job DROP COLUMN IF EXISTS timeout_seconds",
            ],
            label="drop job.checkpoint and job.timeout_seconds",
        )
