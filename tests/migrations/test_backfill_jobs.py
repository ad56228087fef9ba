"""Backfills as jobs: a data revision hands its batches to the ledger, real workers run them.

A test-only chain on a copy of the history: a `data` revision records backfill `item_v2` over
20,000 rows of a table of its own (1,000 keys a batch, each batch logging its key range to
`batch_log`), and a `contract` revision that requires it. Batches are counted, never timed.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from heimdex.db import make_engine
from heimdex.ledger import backfills
from heimdex_db.config import alembic_config
from tests.dbutil import execute, version_of
from tests.stack import Processes, processes, stack_env, wait_for

from .conftest import HistoryCopy, heimdex, url_arg

__all__ = ["processes", "stack_env"]

ROWS = 20_000
BATCH = 1_000
BATCHES = ROWS // BATCH
DATA, CONTRACT = "bf1000000001", "bf1000000002"
HEADER = (
    "from heimdex_db.backfills import backfill_job\n"
    "from heimdex_db.online import set_lock_timeout\n"
)
# Each batch updates its keys and logs its range once: a batch run twice shows as two rows.
BATCH_SQL = (
    "WITH u AS (UPDATE item SET v2 = v * 2 WHERE id BETWEEN :lo AND :hi RETURNING 1)"
    " INSERT INTO batch_log (lo, hi, rows) SELECT :lo, :hi, count(*) FROM u"
)


@pytest.fixture
def engine(db_url: URL) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def _chain(history: HistoryCopy, db_url: URL, rows_per_second: float) -> None:
    execute(
        db_url,
        "CREATE TABLE item (id bigint PRIMARY KEY, v int NOT NULL, v2 int)",
        f"INSERT INTO item (id, v) SELECT g, g FROM generate_series(1, {ROWS}) AS g",
        "CREATE TABLE batch_log (lo bigint, hi bigint, rows int)",
    )
    head = history.head
    history.add_revision(
        DATA,
        head,
        f"""
        set_lock_timeout()
        backfill_job(
            "item_v2",
            table="item",
            batch={BATCH_SQL!r},
            batch_size={BATCH},
            rows_per_second={rows_per_second},
        )
        """,
        header=HEADER + 'phase = "data"\n',
    )
    history.add_revision(
        CONTRACT,
        DATA,
        """
        set_lock_timeout()
        op.execute("ALTER TABLE item ALTER COLUMN v2 SET NOT NULL")
        """,
        header=HEADER + 'phase = "contract"\nrequires_backfills = ("item_v2",)\n',
    )


def _upgrade(history: HistoryCopy, db_url: URL, *target: str) -> Any:
    return heimdex("db", "upgrade", *target, "-c", history.ini, "--database-url", url_arg(db_url))


def _status(history: HistoryCopy, db_url: URL) -> Any:
    return heimdex("db", "status", "-c", history.ini, "--database-url", url_arg(db_url))


def _backfill(engine: Engine) -> backfills.Progress:
    with engine.connect() as conn:
        (found,) = backfills.progress(conn, ["item_v2"])
    return found


def _jobs(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT id, org_id, status::text, attempt, params FROM job"
                    " WHERE type = 'heimdex.backfill'"
                )
            )
        )


def _batches(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT lo, hi, rows FROM batch_log ORDER BY lo")))


def _assert_every_batch_ran_once(engine: Engine) -> None:
    batches = _batches(engine)
    assert len(batches) == BATCHES
    assert [(b.lo, b.hi, b.rows) for b in batches] == [
        (i * BATCH + 1, (i + 1) * BATCH, BATCH) for i in range(BATCHES)
    ]
    with engine.connect() as conn:
        wrong = conn.execute(text("SELECT count(*) FROM item WHERE v2 IS DISTINCT FROM v * 2"))
        assert wrong.scalar_one() == 0


@pytest.mark.slow
def test_a_data_revision_backfills_through_a_worker_and_gates_its_contract(
    history: HistoryCopy, db_url: URL, engine: Engine, processes: Processes
) -> None:
    _chain(history, db_url, rows_per_second=200_000)
    first = _upgrade(history, db_url, DATA)
    assert first.returncode == 0, first.stderr
    (job,) = _jobs(engine)
    assert job.org_id == backfills.BACKFILL_ORG_ID == uuid.UUID(int=0)
    assert (job.status, job.params) == ("queued", {"name": "item_v2"})
    assert _backfill(engine).job_id == job.id

    # The contract refuses while the backfill has not run: one line, nothing changed.
    refused = _upgrade(history, db_url)
    assert refused.returncode == 1
    (line,) = refused.stderr.strip().splitlines()[-1:]
    assert f"revision {CONTRACT} requires backfill item_v2: 0/{ROWS} rows (0%), 0 batches" in line
    assert "queued" in line and "heimdex db upgrade" in line
    assert version_of(db_url) == DATA

    # Applying the data revision again (stamped back, as after a restore) submits nothing new.
    command.stamp(alembic_config(history.ini, database_url=db_url), history.revisions[-3])
    again = _upgrade(history, db_url, DATA)
    assert again.returncode == 0, again.stderr
    assert [j.id for j in _jobs(engine)] == [job.id]

    waiting = _status(history, db_url)
    assert f"backfill: item_v2: 0/{ROWS} rows (0%), 0 batches, queued (job {job.id})" in (
        waiting.stdout
    )

    processes.start("worker")
    wait_for(lambda: _backfill(engine).done, what="the backfill", timeout=120)
    _assert_every_batch_ran_once(engine)
    done = _backfill(engine)
    assert (done.rows_done, done.batches_done) == (ROWS, BATCHES)
    # The throttle paused after every batch but the one that found the end: rows / rate.
    assert done.paused_seconds == pytest.approx(ROWS / 200_000)
    wait_for(lambda: _jobs(engine)[0].status == "succeeded", what="the job's success")

    shown = _status(history, db_url)
    assert f"backfill: item_v2: {ROWS}/{ROWS} rows (100%), {BATCHES} batches, done" in shown.stdout

    passed = _upgrade(history, db_url)
    assert passed.returncode == 0, passed.stderr
    assert version_of(db_url) == CONTRACT


@pytest.mark.slow
def test_a_worker_killed_mid_backfill_resumes_from_its_last_batch(
    history: HistoryCopy, db_url: URL, engine: Engine, processes: Processes
) -> None:
    # 1,000 rows a batch at 4,000 rows a second: a quarter second between batches.
    _chain(history, db_url, rows_per_second=4_000)
    assert _upgrade(history, db_url, DATA).returncode == 0
    first = processes.start("worker")
    wait_for(lambda: _backfill(engine).batches_done >= 3, what="three batches", timeout=60)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    stopped = _backfill(engine)
    assert not stopped.done and stopped.batches_done < BATCHES
    assert len(_batches(engine)) == stopped.batches_done

    # The throttle is settable while the backfill waits: the rest runs without pauses.
    with engine.begin() as conn:
        assert backfills.set_throttle(conn, "item_v2", rows_per_second=None, pause_factor=None)
    processes.start("worker")
    wait_for(lambda: _backfill(engine).done, what="the resumed backfill", timeout=120)
    _assert_every_batch_ran_once(engine)
    (job,) = wait_for(
        lambda: [j for j in _jobs(engine) if j.status == "succeeded"], what="the job's success"
    )
    assert job.attempt >= 1  # the killed attempt counted
    with engine.connect() as conn:
        resumed = conn.execute(
            text(
                "SELECT detail_json FROM job_event WHERE job_id = :id"
                " AND detail_json->>'action' = 'resumed'"
            ),
            {"id": job.id},
        ).all()
    # Killed between a batch's commit and its checkpoint, the checkpoint is one batch behind;
    # the batch itself is not run again (above): its progress committed with it.
    assert resumed[0].detail_json["skipped_through"] in (
        f"batch {stopped.batches_done}",
        f"batch {stopped.batches_done - 1}",
    )
