"""fair queue: jobs placed at turns, one claim order across orgs

Revision ID: d2d60e3ca6c1
Revises: d5f1a9c3e7b2

The claim used to walk every org with queued work on each claim (two index descents per org,
each through the entries the org's claimed jobs left at the head of its range until vacuum):
its cost grew with the number of orgs and with the jobs claimed since the last vacuum. Now each
queued job carries its `turn`, its place in a start-time fair queue, and the claim reads one
index in (priority, turn, due time) order:

- `job.turn` (bigint, NULL until placed): a job is placed at
  max(its org's last turn at that priority + 1, the clock); `job_turn_clock` is the clock, about
  the highest turn claimed so far. An org's backlog takes consecutive turns, a newcomer starts
  at the clock: every org's next job, then every org's one after (round-robin), with no walk.
- `idx_job__claim_order` (priority DESC, turn, run_at): the claim's one scan.
- `idx_job__org_turn` (org_id, priority, turn, id): "the org's last turn at a priority", one
  probe from the top, in `heimdex_private.job_last_turn()`. A function for its settings: with
  bitmap and sequential scans and incremental sorts off, and ordered by (turn, id), which only
  this index gives in order, the probe has one plan. Otherwise it was at times a bitmap scan,
  or a walk down the claim index filtered by org, either way through every placed job of the
  org (or of every org, for an org with none). PL/pgSQL keeps the plan for the session (as a
  SQL function, the probe was planned on every submit: 550 against 365 us of PostgreSQL CPU
  per one-job submit).
- `idx_job__unplaced` (run_at): jobs queued without a turn (scheduled for later, retried,
  requeued, and every job queued before this revision); the claim places them once due.
- `idx_job__queued_claim` goes.

Cost on a live table: the column is nullable with no default (catalog only, under
lock_timeout), the indexes are built and the old one dropped CONCURRENTLY with the online
toolkit (no writer waits; a killed build is rebuilt on the next run). No row is rewritten:
the jobs already queued stay unplaced and are placed by the claims, oldest due first.

Downgrade builds the old claim index again, then drops the function, the indexes, the clock
and the column;
the previous release's claim needs no turns.
"""

from __future__ import annotations

from alembic import op

from heimdex_db.online import (
    create_index,
    ddl,
    drop_index,
    online,
    set_lock_timeout,
)

revision = "d2d60e3ca6c1"
down_revision = "d5f1a9c3e7b2"
branch_labels = None
depends_on = None
supabase_slug = "fair_queue_turns"

TURN_COMMENT = "Claim order within a priority (fair queuing across orgs); NULL until placed"
PLACED = "status = 'queued' AND turn IS NOT NULL"
UNPLACED = "status = 'queued' AND turn IS NULL"
OLD_CLAIM_INDEX = "idx_job__queued_claim"
LAST_TURN = "heimdex_private.job_last_turn"
LAST_TURN_ARGS = "(uuid, integer, bigint)"
LAST_TURN_COMMENT = "Last placed turn of an org at a priority, if at or after floor: one probe"
LAST_TURN_FUNCTION = f"""
CREATE OR REPLACE FUNCTION {LAST_TURN}(org uuid, prio integer, floor bigint) RETURNS bigint
    LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY INVOKER
    SET search_path = ''
    SET enable_bitmapscan = off
    SET enable_seqscan = off
    SET enable_incremental_sort = off
AS $fn$
BEGIN
    RETURN (SELECT j.turn FROM public.job AS j
             WHERE j.status = 'queued' AND j.turn IS NOT NULL
               AND j.org_id = org AND j.priority = prio AND j.turn >= floor
             ORDER BY j.turn DESC, j.id DESC
             LIMIT 1);
END
$fn$"""


def upgrade() -> None:
    set_lock_timeout()
    with online():
        ddl(
            [
                "ALTER TABLE job ADD COLUMN IF NOT EXISTS turn bigint",
                f"COMMENT ON COLUMN job.turn IS '{TURN_COMMENT}'",
                "CREATE SEQUENCE IF NOT EXISTS job_turn_clock MINVALUE 0 START 0",
            ],
            label="add job.turn and job_turn_clock",
        )
        op.execute(LAST_TURN_FUNCTION)
        op.execute(f"COMMENT ON FUNCTION {LAST_TURN}{LAST_TURN_ARGS} IS '{LAST_TURN_COMMENT}'")
        create_index("idx_job__claim_order", "job", "(priority DESC, turn, run_at)", where=PLACED)
        create_index("idx_job__org_turn", "job", "(org_id, priority, turn, id)", where=PLACED)
        create_index("idx_job__unplaced", "job", "(run_at)", where=UNPLACED)
        drop_index(OLD_CLAIM_INDEX)


def downgrade() -> None:
    set_lock_timeout()
    with online():
        create_index(
            OLD_CLAIM_INDEX, "job", "(org_id, priority DESC, run_at)", where="status = 'queued'"
        )
        op.execute(f"DROP FUNCTION IF EXISTS {LAST_TURN}{LAST_TURN_ARGS}")
        drop_index("idx_job__unplaced")
        drop_index("idx_job__org_turn")
        drop_index("idx_job__claim_order")
        ddl(
            [
                "DROP SEQUENCE IF EXISTS job_turn_clock",
                "ALTER TABLE job DROP COLUMN IF EXISTS turn",
            ],
            label="drop job.turn and job_turn_clock",
        )
