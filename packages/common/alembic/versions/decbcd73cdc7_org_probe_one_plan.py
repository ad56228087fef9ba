"""the org probe keeps its index whatever the statistics say

Revision ID: decbcd73cdc7
Revises: e4a7c2b9d5f1

`heimdex_private.job_last_turn()` (an org's last placed turn at a priority: one probe per org
of every submit and every placing step) gains `SET enable_sort = off`. Its one plan without a
sort is the backward index-only scan of `idx_job__org_turn`, which gives (turn, id) in order.
With statistics taken while few jobs were placed (a backlog that came due unplaced, analyzed
before the claims placed it), the planner preferred a backward walk of `idx_job__claim_order`
filtered by org, then a sort: through every placed job at that priority, on each probe. With
100,000 jobs placed over 10,000 orgs a probe took 52 ms instead of 0.03, and a claim placing the
next 1,000 due jobs (about 900 orgs) took seconds.

A catalog change (CREATE OR REPLACE FUNCTION, its comment kept): no table is locked, no row is
read; sessions plan the probe again at their next call. Downgrade restores the function as
d2d60e3ca6c1 made it.
"""

from __future__ import annotations

from alembic import op

from heimdex_db.online import set_lock_timeout

revision = "decbcd73cdc7"
down_revision = "e4a7c2b9d5f1"
branch_labels = None
depends_on = None
supabase_slug = "org_probe_one_plan"

LAST_TURN = "heimdex_private.job_last_turn"
_FUNCTION = """
CREATE OR REPLACE FUNCTION {name}(org uuid, prio integer, floor bigint) RETURNS bigint
    LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY INVOKER
    SET search_path = ''
    SET enable_bitmapscan = off
    SET enable_seqscan = off
    SET enable_incremental_sort = off{settings}
AS $fn$
BEGIN
    RETURN (SELECT j.turn FROM public.job AS j
             WHERE j.status = 'queued' AND j.turn IS NOT NULL
               AND j.org_id = org AND j.priority = prio AND j.turn >= floor
             ORDER BY j.turn DESC, j.id DESC
             LIMIT 1);
END
$fn$"""
LAST_TURN_FUNCTION = _FUNCTION.format(name=LAST_TURN, settings="\n    SET enable_sort = off")
PREVIOUS_FUNCTION = _FUNCTION.format(name=LAST_TURN, settings="")


def upgrade() -> None:
    set_lock_timeout()
    op.execute(LAST_TURN_FUNCTION)


def downgrade() -> None:
    set_lock_timeout()
    op.execute(PREVIOUS_FUNCTION)
