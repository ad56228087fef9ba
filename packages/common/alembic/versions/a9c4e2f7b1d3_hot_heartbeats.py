"""hot heartbeats: job's fillfactor leaves each page room for new versions of its rows

Revision ID: a9c4e2f7b1d3
Revises: a9d4c6e2f8b1

A worker renews every lease it holds in one statement (the heartbeat, every few seconds), and
records each stage boundary of a running job: both change no indexed column, so each new row
version can be a heap-only tuple (HOT: no index entry, reclaimed by the next visit to its page)
when the row's page has room for it. Pages filled to 100% (the default) have none once their
jobs run: a worker holding most of a page's jobs moves most of their new versions to other pages
at each heartbeat, each with an entry in every index of `job`, until the running rows are
spread thin (bench/long_jobs.py, one worker holding 250 jobs: 80% of the updates HOT over 3
minutes, the rows spreading over three times the pages). `fillfactor = 75` leaves every page
that inserts fill a quarter free: the versions that do not fit move once, to pages that keep
room, and from about the seventh heartbeat on every one is HOT
(tests/ledger/test_hot_heartbeats.py; 99.3% in the same run). 50 would make even the first
heartbeats HOT, at twice the heap.

What it costs: pages filled from now on (new jobs, on new pages or on the room retention frees)
hold three quarters of the rows they held, so the heap of the jobs written from now on takes a
third more pages; the indexes are unchanged. Existing pages are not rewritten.

Cost on a live table: a storage parameter, catalog only (SHARE UPDATE EXCLUSIVE: reads and
writes go on), under lock_timeout. Downgrade resets it; pages filled meanwhile keep their room.
"""

from __future__ import annotations

from heimdex_db.online import ddl, online, set_lock_timeout

revision = "a9c4e2f7b1d3"
down_revision = "a9d4c6e2f8b1"
branch_labels = None
depends_on = None
supabase_slug = "hot_heartbeats"
phase = "expand"

FILLFACTOR = 75


def upgrade() -> None:
    set_lock_timeout()
    with online():
        ddl(f"ALTER TABLE job SET (fillfactor = {FILLFACTOR})", label="set job's fillfactor")


def downgrade() -> None:
    set_lock_timeout()
    with online():
        ddl("ALTER TABLE job RESET (fillfactor)", label="reset job's fillfactor")
