"""indexes for scale: the API's list by status, retention's walk over finished jobs

Revision ID: d5f1a9c3e7b2
Revises: b8e2d4f6a1c3

- `idx_job__org_id_status_created_at_id` (org_id, status, created_at, id) serves
  `GET /jobs?status=...`: the org's jobs in one status, newest first (read backwards), from the
  keyset cursor on; a status the org has no job in costs one probe instead of a walk over the
  org's whole history.
- `idx_job__status_finished_at_id` (status, finished_at, id), partial on the finished states,
  serves retention: each status's oldest finished jobs, in `finished_at` order, with the
  keyset cursor (`finished_at`, `id`) of a pass.

Both are built CONCURRENTLY with the online toolkit (no writer waits; an INVALID index left by
a killed build is dropped and rebuilt on the next run), and dropped CONCURRENTLY on downgrade.
No row changes.
"""

from __future__ import annotations

from heimdex_db.online import create_index, drop_index, online, set_lock_timeout

revision = "d5f1a9c3e7b2"
down_revision = "b8e2d4f6a1c3"
branch_labels = None
depends_on = None
supabase_slug = "indexes_for_scale"

LIST_INDEX = "idx_job__org_id_status_created_at_id"
RETENTION_INDEX = "idx_job__status_finished_at_id"
FINISHED = "status IN ('succeeded', 'failed', 'canceled', 'dead_letter')"


def upgrade() -> None:
    set_lock_timeout()
    with online():
        create_index(LIST_INDEX, "job", "(org_id, status, created_at, id)")
        create_index(RETENTION_INDEX, "job", "(status, finished_at, id)", where=FINISHED)


def downgrade() -> None:
    set_lock_timeout()
    with online():
        drop_index(RETENTION_INDEX)
        drop_index(LIST_INDEX)
