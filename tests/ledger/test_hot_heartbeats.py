"""Heartbeats stay HOT. A worker renews every lease it holds in one statement, and each renewed
row gets a new version: a heap-only tuple (no index entry, reclaimed by the next visit to its
page) only when the row's page has room for it. On full pages the versions move to other pages,
with an entry in every index of `job`, heartbeat after heartbeat; `job`'s fillfactor leaves the
room, so that after the first few heartbeats (the rows that do not fit move once, to pages with
room) every one is HOT, even for a worker holding every job of its pages."""

from __future__ import annotations

import uuid

from sqlalchemy import Connection, Engine, text

from heimdex.ledger import repository, service
from heimdex.ledger.registry import load_registry

# Several pages' worth of jobs, all claimed by one worker; its heartbeats for a minute.
JOBS = 300
ROUNDS = 12
SETTLED = 3  # the last heartbeats, all HOT


def _updates(conn: Connection) -> tuple[int, int]:
    """`job` rows updated by this backend and not yet reported to the statistics (it reports
    at the end of a transaction, at most once a second), and how many of them HOT."""
    row = conn.execute(
        text(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
            " WHERE relid = CAST('job' AS regclass)"
        )
    ).one()
    return int(row[0]), int(row[1])


def test_the_heartbeats_of_a_worker_holding_whole_pages_of_jobs_settle_hot(engine: Engine) -> None:
    registry = load_registry()
    with engine.begin() as conn:
        service.submit_jobs(
            conn, registry, org_id=uuid.uuid4(), specs=[service.JobSpec("noop", {})] * JOBS
        )
    with engine.begin() as conn:
        claimed = service.claim(conn, worker_id="w1", limit=JOBS, lease_seconds=30)
    tokens = [job.lease_token for job in claimed.jobs]
    assert len(tokens) == JOBS
    with engine.connect() as conn:
        pages = conn.execute(
            text("SELECT count(DISTINCT (ctid::text::point)[0]) FROM job WHERE status = 'running'")
        ).scalar_one()
    assert pages > 3, "the claimed jobs fill several pages"
    hot_per_heartbeat = []
    for _ in range(ROUNDS):
        with engine.begin() as conn:
            before = _updates(conn)
            kept = repository.renew_leases(conn, tokens, lease_seconds=30)
            after = _updates(conn)
        assert kept == set(tokens)
        assert after[0] - before[0] == JOBS
        hot_per_heartbeat.append(after[1] - before[1])
    assert all(hot >= 0.95 * JOBS for hot in hot_per_heartbeat[-SETTLED:]), (
        f"HOT updates of {JOBS} per heartbeat: {hot_per_heartbeat}"
    )
