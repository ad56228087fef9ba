"""Backfills as jobs: a data revision hands its batches to the ledger, real workers run them.

A test-only chain on a copy of the history: a `data` revision records backfill `item_v2` over
20,000 rows of a table of its own (1,000 keys a batch, each batch logging its key range to
`batch_log`), and a `contract` revision that requires it. Batches are counted, never timed.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from heimdex.db import make_engine
from heimdex.ledger import backfills
from heimdex_api.auth import READONLY_ROLE, issue_token
from heimdex_db.backfills import BackfillNotDone
from heimdex_db.config import alembic_config
from heimdex_db.context import DbContext
from heimdex_db.migrate import upgrade
from heimdex_db.supabase.artifacts import sql
from tests.dbutil import execute, version_of
from tests.ops.test_api import as_role
from tests.stack import (
    SECRET,
    Processes,
    ThreadWorkers,
    auth,
    client,
    processes,
    settings,
    stack_env,
    thread_workers,
    wait_for,
)

from .conftest import HistoryCopy, heimdex, url_arg

__all__ = ["client", "processes", "settings", "stack_env", "thread_workers"]

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


def _recorded(history: HistoryCopy, db_url: URL, rows_per_second: float = 1_000_000) -> DbContext:
    _chain(history, db_url, rows_per_second)
    ctx = DbContext.build(history.ini, database_url=db_url)
    upgrade(ctx, DATA)
    return ctx


def test_a_lost_attempt_beside_its_successor_runs_no_batch_twice(
    history: HistoryCopy, db_url: URL, engine: Engine
) -> None:
    _recorded(history, db_url)
    ran: list[backfills.Batch] = []
    with engine.connect() as lost:
        lost.begin()
        first = backfills.run_batch(lost, "item_v2")

        def successor() -> None:
            with engine.begin() as conn:
                ran.append(backfills.run_batch(conn, "item_v2"))

        thread = threading.Thread(target=successor)
        thread.start()
        wait_for(lambda: _waiting_on_a_lock(engine), what="the successor to wait")
        lost.commit()
    thread.join(timeout=30)
    assert (first.last_key, ran[0].last_key) == (str(BATCH), str(2 * BATCH))
    assert [(b.lo, b.hi) for b in _batches(engine)] == [(1, BATCH), (BATCH + 1, 2 * BATCH)]
    assert _backfill(engine).batches_done == 2


def _waiting_on_a_lock(engine: Engine) -> bool:
    with engine.connect() as conn:
        found = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
        return bool(found.scalar_one())


def test_a_contract_whose_backfill_no_revision_recorded_refuses(
    history: HistoryCopy, db_url: URL, engine: Engine
) -> None:
    ctx = _recorded(history, db_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM job_backfill"))
    with pytest.raises(BackfillNotDone, match="requires backfill 'item_v2', which no revision"):
        upgrade(ctx)
    assert version_of(db_url) == DATA


def test_a_stopped_backfill_names_the_retry(
    history: HistoryCopy, db_url: URL, engine: Engine
) -> None:
    ctx = _recorded(history, db_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE job SET status = 'dead_letter', finished_at = now()"
                " WHERE type = 'heimdex.backfill'"
            )
        )
    (job,) = _jobs(engine)
    with pytest.raises(BackfillNotDone) as refused:
        upgrade(ctx)
    assert f"dead_letter (job {job.id}); it stopped (dead_letter)" in str(refused.value)
    assert f"heimdex jobs retry {job.id} --reason" in str(refused.value)
    assert "heimdex db backfill finish item_v2" in str(refused.value)


def test_one_upgrade_applies_the_data_revision_and_stops_at_its_contract(
    history: HistoryCopy, db_url: URL
) -> None:
    _chain(history, db_url, rows_per_second=1_000_000)
    proc = _upgrade(history, db_url)
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert f"{DATA} applied; now at {DATA}, stopped: revision {CONTRACT} requires" in line
    assert version_of(db_url) == DATA


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ('table="item; DROP TABLE item"', "table must be a plain identifier"),
        ("batch_size=0", "batch_size must be at least 1"),
        ("rows_per_second=-5", "rows_per_second must be positive"),
    ],
)
def test_a_bad_backfill_definition_refuses_and_changes_nothing(
    history: HistoryCopy, db_url: URL, engine: Engine, argument: str, message: str
) -> None:
    execute(db_url, "CREATE TABLE item (id bigint PRIMARY KEY, v int, v2 int)")
    before = version_of(db_url)
    arguments = {"table": '"item"', "batch": '"UPDATE item SET v2 = v"', "batch_size": "10"}
    name, _, value = argument.partition("=")
    arguments[name] = value
    history.add_revision(
        DATA,
        history.head,
        "set_lock_timeout()\nbackfill_job('bad', "
        + ", ".join(f"{k}={v}" for k, v in arguments.items())
        + ")",
        header=HEADER,
    )
    proc = _upgrade(history, db_url)
    assert proc.returncode == 1
    assert f"backfill 'bad': {message}" in proc.stderr.strip().splitlines()[-1]
    assert version_of(db_url) == before
    assert _jobs(engine) == []
    with engine.connect() as conn:
        assert backfills.progress(conn) == []


def test_heimdex_db_backfill_throttle_sets_the_throttle_or_names_the_backfills(
    history: HistoryCopy, db_url: URL, engine: Engine
) -> None:
    _recorded(history, db_url)
    args = ("-c", history.ini, "--database-url", url_arg(db_url))
    proc = heimdex("db", "backfill", "throttle", "item_v2", "--rows-per-second", "500", *args)
    assert proc.returncode == 0, proc.stderr
    assert f"throttle of item_v2 set; item_v2: 0/{ROWS} rows (0%)" in proc.stdout
    assert (_backfill(engine).rows_per_second, _backfill(engine).pause_factor) == (500, None)
    proc = heimdex("db", "backfill", "throttle", "item_v2", "--pause-factor", "0.5", *args)
    assert (_backfill(engine).rows_per_second, _backfill(engine).pause_factor) == (None, 0.5)
    proc = heimdex("db", "backfill", "throttle", "nope", "--pause-factor", "1", *args)
    assert proc.returncode == 1
    assert "no backfill is named 'nope' (backfills: item_v2)" in proc.stderr
    assert _backfill(engine).pause_factor == 0.5
    proc = heimdex("db", "backfill", "throttle", "item_v2", "--rows-per-second", "0", *args)
    assert proc.returncode == 2 and "rows-per-second" in proc.stderr


def test_the_ops_api_and_the_dashboard_show_backfill_progress(
    history: HistoryCopy, db_url: URL, engine: Engine, client: TestClient
) -> None:
    _recorded(history, db_url)
    for _ in range(3):
        with engine.begin() as conn:
            backfills.run_batch(conn, "item_v2")
    (job,) = _jobs(engine)
    listed = client.get("/ops/backfills", headers=as_role(READONLY_ROLE, "op-bob"))
    assert listed.status_code == 200, listed.text
    (item,) = listed.json()["items"]
    assert {k: item[k] for k in ("name", "revision", "table_name", "state", "percent")} == {
        "name": "item_v2",
        "revision": DATA,
        "table_name": "item",
        "state": "queued",
        "percent": 15,
    }
    assert (item["rows_done"], item["estimated_rows"], item["batches_done"]) == (3000, ROWS, 3)
    assert item["job_id"] == str(job.id)
    assert client.get("/ops/backfills").status_code == 401

    token = issue_token(SECRET, org_id=uuid.uuid4(), sub="op-bob", role=READONLY_ROLE)
    assert client.post("/ui/signin", data={"token": token}, follow_redirects=False).is_redirect
    page = client.get("/ui/backfills")
    assert page.status_code == 200
    assert "item_v2" in page.text and f"3000 / {ROWS}" in page.text
    assert '<progress max="100" value="15">' in page.text
    assert f"/ui/jobs/{job.id}" in page.text


def test_a_tenant_submitting_a_backfill_job_runs_no_batch(
    history: HistoryCopy,
    db_url: URL,
    engine: Engine,
    client: TestClient,
    thread_workers: ThreadWorkers,
) -> None:
    _recorded(history, db_url)
    with engine.begin() as conn:  # the revision's own job is out of the way
        conn.execute(text("UPDATE job SET status = 'canceled', finished_at = now()"))
    tenant = uuid.uuid4()
    submitted = client.post(
        "/jobs",
        json={"type": "heimdex.backfill", "params": {"name": "item_v2"}, "max_attempts": 1},
        headers=auth(tenant),
    )
    assert submitted.status_code == 201, submitted.text
    thread_workers.start()
    job_id = submitted.json()["id"]

    def ended() -> Any:
        with engine.connect() as conn:
            return conn.execute(
                text(
                    "SELECT status::text, last_error_code, last_error_message FROM job"
                    " WHERE id = :id AND status IN ('failed', 'dead_letter')"
                ),
                {"id": job_id},
            ).first()

    row = wait_for(ended, what="the tenant's job to fail")
    assert row.last_error_code == "BACKFILL_INVALID"
    assert f"not {job_id}" in row.last_error_message
    assert _batches(engine) == [] and _backfill(engine).batches_done == 0


def test_heimdex_db_backfill_finish_runs_the_rest_and_lets_the_contract_pass(
    history: HistoryCopy, db_url: URL, engine: Engine
) -> None:
    _recorded(history, db_url, rows_per_second=1)  # a second's pause per row for the job
    with engine.begin() as conn:
        backfills.run_batch(conn, "item_v2")
    refused = _upgrade(history, db_url)
    assert refused.returncode == 1
    assert "heimdex db backfill finish item_v2" in refused.stderr
    args = ("-c", history.ini, "--database-url", url_arg(db_url))
    proc = heimdex("db", "backfill", "finish", "item_v2", "--no-throttle", *args)
    assert proc.returncode == 0, proc.stderr
    assert f"item_v2: {ROWS}/{ROWS} rows (100%), {BATCHES} batches, done" in proc.stdout
    _assert_every_batch_ran_once(engine)
    assert _upgrade(history, db_url).returncode == 0
    assert version_of(db_url) == CONTRACT
    unknown = heimdex("db", "backfill", "finish", "nope", *args)
    assert unknown.returncode == 1 and "no backfill is named 'nope'" in unknown.stderr


def _apply(db_url: URL, path: Path) -> None:
    """One artifact as one batch, as the Supabase CLI applies a file."""
    with psycopg.connect(url_arg(db_url.set(drivername="postgresql")), autocommit=True) as conn:
        conn.execute(path.read_text().encode())


def test_the_supabase_artifacts_record_the_backfill_once_and_guard_the_contract(
    history: HistoryCopy,
    db_url: URL,
    engine: Engine,
    thread_workers: ThreadWorkers,
    tmp_path: Path,
) -> None:
    _chain(history, db_url, rows_per_second=1_000_000)
    out = tmp_path / "migrations"
    sql(DbContext.build(history.ini), output_dir=out)
    *_, data, contract = sorted(out.glob("*.sql"))
    assert "requires backfills that are not done" in contract.read_text()

    _apply(db_url, data)
    _apply(db_url, data)  # a file applied twice records one backfill and one job
    (job,) = _jobs(engine)
    assert (job.org_id, job.status, job.params) == (uuid.UUID(int=0), "queued", {"name": "item_v2"})
    assert _backfill(engine).job_id == job.id
    assert _backfill(engine).estimated_rows == ROWS

    with pytest.raises(psycopg.errors.RaiseException, match=r"item_v2 \(0/20000 rows\)"):
        _apply(db_url, contract)
    with engine.connect() as conn:
        nullable = conn.execute(
            text(
                "SELECT is_nullable FROM information_schema.columns"
                " WHERE table_name = 'item' AND column_name = 'v2'"
            )
        ).scalar_one()
    assert nullable == "YES"

    thread_workers.start()
    wait_for(lambda: _backfill(engine).done, what="the backfill", timeout=120)
    _assert_every_batch_ran_once(engine)
    _apply(db_url, contract)
    assert version_of(db_url) == CONTRACT


def test_a_failing_batch_is_retried_by_the_job_policy_from_that_batch(
    history: HistoryCopy, db_url: URL, engine: Engine, thread_workers: ThreadWorkers
) -> None:
    # The sixth batch divides by the rows of `fixed`: it fails until the test adds one.
    failing = (
        "WITH u AS (UPDATE item SET v2 = v * 2 WHERE id BETWEEN :lo AND :hi RETURNING 1)"
        " INSERT INTO batch_log (lo, hi, rows)"
        " SELECT :lo, :hi, count(*) + CASE WHEN CAST(:lo AS bigint) > 5000"
        " THEN 0 / (SELECT count(*) FROM fixed) ELSE 0 END FROM u"
    )
    _chain(history, db_url, rows_per_second=1_000_000)
    execute(db_url, "CREATE TABLE fixed (x int)")
    ctx = DbContext.build(history.ini, database_url=db_url)
    upgrade(ctx, DATA)
    with engine.begin() as conn:
        conn.execute(text("UPDATE job_backfill SET batch_sql = :sql"), {"sql": failing})
    thread_workers.start()

    def failed_once() -> Any:
        with engine.connect() as conn:
            return conn.execute(
                text(
                    "SELECT last_error_code, last_error_message FROM job"
                    " WHERE type = 'heimdex.backfill' AND attempt >= 1 AND status = 'queued'"
                )
            ).first()

    failure = wait_for(failed_once, what="a failed attempt, queued again")
    assert failure.last_error_code == "DataError"
    assert "division by zero" in failure.last_error_message
    assert _backfill(engine).batches_done == 5
    execute(db_url, "INSERT INTO fixed VALUES (1)")
    wait_for(lambda: _backfill(engine).done, what="the backfill", timeout=120)
    _assert_every_batch_ran_once(engine)
