"""The online 3af4686817cc survives SIGKILL: the next `heimdex db upgrade` finishes, nothing lost.

A `heimdex db upgrade` subprocess is killed (SIGKILL, by PID) during the batched backfill and
during the concurrent index build; the next run must finish, and the database must then hold the
same rows, the same normalisation events and the same schema as one upgraded without a crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from alembic import command
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from heimdex_db.config import alembic_config
from tests.conftest import DatabaseFactory
from tests.dbutil import execute, scalar, schema_of, version_of

from .conftest import HEIMDEX, clean_env, url_arg

ROWS = 200_000
BATCH = "500"
HARDENING = "3af4686817cc"

# Shaped like the field's data at 001: terminal rows without finished_at, running rows with a
# stale one, over-long error codes and messages, so most batches also write events.
LOAD = """
INSERT INTO job (org_id, type, status, attempt, created_at, updated_at, started_at,
                 finished_at, last_error_code, last_error_message)
SELECT ('00000000-0000-0000-0000-' || lpad(((g % 50) + 1)::text, 12, '0'))::uuid,
       'mock_process', s.status, g % 3, s.created, s.created + interval '2 min',
       CASE WHEN s.status <> 'queued' THEN s.created + interval '5 s' END,
       CASE WHEN s.status IN ('succeeded', 'canceled') AND g % 50 <> 0
              THEN s.created + interval '2 min'
            WHEN s.status = 'failed' THEN s.created + interval '1 min'
            WHEN s.status = 'running' AND g % 3 = 0 THEN s.created + interval '1 min' END,
       CASE WHEN s.status = 'failed' THEN
         CASE WHEN g % 7 = 0 THEN repeat('E', 90) ELSE 'WORKER_ERROR' END END,
       CASE WHEN s.status = 'failed' THEN
         CASE WHEN g % 5 = 0 THEN repeat('Traceback line ', 200) ELSE 'boom' END END
  FROM generate_series(1, :rows) AS g
 CROSS JOIN LATERAL (
    SELECT CASE WHEN g % 100 < 78 THEN 'succeeded' WHEN g % 100 < 88 THEN 'failed'
                WHEN g % 100 < 92 THEN 'canceled' WHEN g % 100 < 96 THEN 'running'
                ELSE 'queued' END AS status,
           timestamptz '2026-01-01' - (g || ' seconds')::interval AS created) AS s
"""
# to_jsonb: every column by name, so databases whose columns differ only in order compare equal
# (the online revision adds and swaps columns; the transactional one alters them in place).
ROWS_CHECKSUM = (
    "SELECT count(*) || ':' || md5(string_agg(to_jsonb(j)::text, '|' ORDER BY id)) FROM job j"
)
EVENTS_CHECKSUM = """
SELECT count(*) || ':' || md5(string_agg(job_id::text || detail_json::text, '|'
                                         ORDER BY job_id, detail_json::text))
  FROM job_event WHERE detail_json ->> 'action' = 'migration.normalized'
"""
# Identity of every row at 001, which the upgrade must keep: no row lost, none invented.
IDENTITY_CHECKSUM = (
    "SELECT count(*) || ':' || md5(string_agg(id::text || org_id::text || created_at::text, "
    "'|' ORDER BY id)) FROM job"
)


# Both tests clone the seed and only read the reference: one of each per module, and per xdist
# worker (the group would keep both on one worker; pytest-xdist 3.8 ignores it on pytest 9).
# Slow: a 200k-row seed, upgrades killed mid-way.
pytestmark = [pytest.mark.xdist_group("online_seed"), pytest.mark.slow]


@pytest.fixture(scope="module")
def seeded(create_database: DatabaseFactory) -> tuple[URL, URL, str]:
    """(database at 001 with ROWS rows, the same upgraded without a crash, identity checksum)."""
    seed = create_database()
    command.upgrade(alembic_config(database_url=seed), "001_job_ledger_init")
    engine = create_engine(seed)
    with engine.begin() as conn:
        conn.execute(text(LOAD), {"rows": ROWS})
    engine.dispose()
    identity = str(scalar(seed, IDENTITY_CHECKSUM))
    reference = create_database(template=seed.database)
    _finish(reference)
    return seed, reference, identity


def _upgrade(url: URL, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(HEIMDEX), "db", "upgrade", HARDENING, "--database-url", url_arg(url)],
        env=clean_env(HEIMDEX_BACKFILL_BATCH=BATCH, **env),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


def _lines(proc: subprocess.Popen[str]) -> Iterator[str]:
    assert proc.stderr is not None
    yield from proc.stderr


def _finish(url: URL) -> str:
    proc = _upgrade(url)
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return err


def _assert_same_as_reference(url: URL, reference: URL, identity: str) -> None:
    assert version_of(url) == HARDENING
    assert scalar(url, IDENTITY_CHECKSUM) == identity
    assert scalar(url, ROWS_CHECKSUM) == scalar(reference, ROWS_CHECKSUM)
    assert scalar(url, EVENTS_CHECKSUM) == scalar(reference, EVENTS_CHECKSUM)
    assert schema_of(url) == schema_of(reference)


def test_sigkill_during_the_backfill_then_upgrade_finishes_with_every_row(
    seeded: tuple[URL, URL, str], create_database: DatabaseFactory
) -> None:
    seed, reference, identity = seeded
    url = create_database(template=seed.database)
    proc = _upgrade(url)
    progress = 0
    seen = []
    for line in _lines(proc):
        seen.append(line)
        if "normalise job rows:" in line and "%)" in line:
            progress += 1
            if progress == 2:  # at least a second of batches committed
                os.kill(proc.pid, signal.SIGKILL)
                break
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"ended before it could be killed: {seen}"
    time.sleep(0.5)  # the backend finishes its batch (committed) and notices the client is gone
    done = int(str(scalar(url, "SELECT count(*) FROM job WHERE status_new IS NOT NULL")))
    assert 0 < done < ROWS, done
    assert version_of(url) == "001_job_ledger_init"

    err = _finish(url)
    assert "normalise job rows" in err
    _assert_same_as_reference(url, reference, identity)


def test_sigkill_during_the_concurrent_index_build_leaves_an_invalid_index_that_is_rebuilt(
    seeded: tuple[URL, URL, str], create_database: DatabaseFactory
) -> None:
    seed, reference, identity = seeded
    url = create_database(template=seed.database)
    # Makes the index build wait for its snapshot (CREATE INDEX CONCURRENTLY waits for every
    # older transaction before it marks the index valid): a window to kill it in. Opened once
    # the new columns exist, since it would otherwise hold up their ALTER TABLE.
    blocker_engine = create_engine(url)
    blocker = blocker_engine.connect()
    # The backend of a killed client notices at once even while it waits on a lock.
    proc = _upgrade(url, PGOPTIONS="-c client_connection_check_interval=100ms")
    try:
        for line in _lines(proc):
            if "batches of" in line:
                blocker.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
                blocker.execute(text("SELECT count(*) FROM job_event"))
                break
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            phase = scalar(
                url,
                "SELECT p.phase FROM pg_stat_progress_create_index p"
                " JOIN pg_class c ON c.oid = p.index_relid"
                " WHERE c.relname = 'idx_job__status_created_at'",
            )
            if phase == "waiting for old snapshots":
                break
            assert proc.poll() is None, "the upgrade ended before the index build"
            time.sleep(0.05)
        else:
            pytest.fail("the index build never reached its wait")
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        for _ in range(100):
            if not scalar(
                url,
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE query LIKE 'CREATE INDEX CONCURRENTLY%' AND pid <> pg_backend_pid()",
            ):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the killed client's backend kept building the index")
    finally:
        blocker.rollback()
        blocker.close()
        blocker_engine.dispose()
    assert (
        scalar(
            url,
            "SELECT indisvalid FROM pg_index"
            " WHERE indexrelid = 'idx_job__status_created_at'::regclass",
        )
        is False
    )
    assert version_of(url) == "001_job_ledger_init"

    err = _finish(url)
    assert "idx_job__status_created_at is INVALID" in err
    _assert_same_as_reference(url, reference, identity)
    execute(url, "SELECT 1")  # the database is usable
