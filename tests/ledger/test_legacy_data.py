"""Data the field's databases hold, carried through the history without loss."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from alembic import command
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from heimdex_db.config import alembic_config
from heimdex_db.verify.schema import snapshot

PRE_LEDGER_JOBS = """
CREATE TABLE jobs (
    id UUID PRIMARY KEY,
    status VARCHAR(20) NOT NULL,
    stage VARCHAR(50),
    progress INTEGER DEFAULT 0,
    result JSONB,
    error TEXT,
    created_at TIMESTAMPTZ DEFAULT now(),
    updated_at TIMESTAMPTZ DEFAULT now()
);
CREATE INDEX idx_jobs_status ON jobs (status);
CREATE INDEX idx_jobs_created_at ON jobs (created_at DESC);
"""


@pytest.fixture
def eng(empty_db_url: URL) -> Iterator[Engine]:
    engine = create_engine(empty_db_url)
    yield engine
    engine.dispose()


def _exec(engine: Engine, sql: str, **params: object) -> None:
    with engine.begin() as conn:
        conn.execute(text(sql), params)


def _rows(engine: Engine, sql: str, **params: object) -> list[dict[str, object]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


def _legacy_job(engine: Engine, status: str, **values: object) -> uuid.UUID:
    job_id = uuid.uuid4()
    _exec(
        engine,
        "INSERT INTO jobs (id, status, stage, progress, result, error) "
        "VALUES (:id, :status, :stage, :progress, CAST(:result AS jsonb), :error)",
        id=job_id,
        status=status,
        stage=values.get("stage"),
        progress=values.get("progress", 0),
        result=json.dumps(values["result"]) if "result" in values else None,
        error=values.get("error"),
    )
    return job_id


def test_pre_ledger_jobs_are_carried_into_the_ledger(empty_db_url: URL, eng: Engine) -> None:
    _exec(eng, PRE_LEDGER_JOBS)
    ids = {
        "pending": _legacy_job(eng, "pending"),
        "processing": _legacy_job(eng, "processing", stage="analyzing", progress=40),
        "completed": _legacy_job(
            eng, "completed", stage="indexing", progress=100, result={"scenes": 12}
        ),
        "failed": _legacy_job(eng, "failed", error="Traceback: boom"),
    }
    org = uuid.uuid4()
    cfg = alembic_config(database_url=empty_db_url)
    cfg.cmd_opts = None
    cfg.attributes["x_arguments"] = None
    # -x legacy_org_id=... as the CLI passes it
    from argparse import Namespace

    cfg.cmd_opts = Namespace(x=[f"legacy_org_id={org}"])
    command.upgrade(cfg, "001_job_ledger_init")

    assert _rows(eng, "SELECT to_regclass('public.jobs') AS t") == [{"t": None}]
    jobs = {r["id"]: r for r in _rows(eng, "SELECT * FROM job")}
    expected = {
        "pending": "queued",
        "processing": "running",
        "completed": "succeeded",
        "failed": "failed",
    }
    assert set(jobs) == set(ids.values())
    for legacy, job_id in ids.items():
        assert jobs[job_id]["status"] == expected[legacy]
        assert jobs[job_id]["org_id"] == org
        assert jobs[job_id]["type"] == "legacy"
    assert jobs[ids["failed"]]["last_error_message"] == "Traceback: boom"

    events = {r["job_id"]: r for r in _rows(eng, "SELECT * FROM job_event")}
    kept = events[ids["completed"]]["detail_json"]["legacy_row"]
    assert kept["stage"] == "indexing"
    assert kept["progress"] == 100
    assert kept["result"] == {"scenes": 12}
    assert events[ids["completed"]]["prev_status"] == "completed"

    command.upgrade(cfg, "head")
    assert {r["id"] for r in _rows(eng, "SELECT id FROM job")} == set(ids.values())

    # All the way back down: the pre-ledger table returns with its rows.
    command.downgrade(cfg, "base")
    back = {r["id"]: r for r in _rows(eng, "SELECT * FROM jobs")}
    assert set(back) == set(ids.values())
    assert back[ids["processing"]]["stage"] == "analyzing"
    assert back[ids["completed"]]["result"] == {"scenes": 12}


def test_unknown_pre_ledger_status_refuses_and_changes_nothing(
    empty_db_url: URL, eng: Engine
) -> None:
    _exec(eng, PRE_LEDGER_JOBS)
    _legacy_job(eng, "pending")
    _legacy_job(eng, "exploded")
    _legacy_job(eng, "exploded")
    before = _snapshot(eng)

    with pytest.raises(DBAPIError, match=r"'exploded' \(2 rows\)"):
        command.upgrade(alembic_config(database_url=empty_db_url), "head")

    assert _snapshot(eng) == before
    assert len(_rows(eng, "SELECT * FROM jobs")) == 3


def _snapshot(engine: Engine) -> dict[str, object]:
    with engine.connect() as conn:
        return snapshot(conn)


def _at_001(empty_db_url: URL) -> None:
    command.upgrade(alembic_config(database_url=empty_db_url), "001_job_ledger_init")


def _job_001(engine: Engine, status: str, **values: object) -> uuid.UUID:
    job_id = uuid.uuid4()
    cols = {
        "id": job_id,
        "org_id": uuid.uuid4(),
        "type": "mock_process",
        "status": status,
        **values,
    }
    names = ", ".join(cols)
    binds = ", ".join(f":{c}" for c in cols)
    _exec(engine, f"INSERT INTO job ({names}) VALUES ({binds})", **cols)
    return job_id


def test_hardening_upgrades_every_row_the_001_schema_admits(empty_db_url: URL, eng: Engine) -> None:
    _at_001(empty_db_url)
    long_code = "E" * 100
    long_message = "Traceback (most recent call last):\n" + "x" * 9000
    ids = {
        "ok_queued": _job_001(eng, "queued"),
        "ok_done": _job_001(eng, "succeeded", finished_at="2025-10-01T00:00:00Z"),
        "terminal_no_finish": _job_001(eng, "failed"),
        "canceled_no_finish": _job_001(eng, "canceled"),
        "retry_stale_finish": _job_001(
            eng, "running", finished_at="2025-10-02T00:00:00Z", started_at="2025-10-01T00:00:00Z"
        ),
        "queued_stale_finish": _job_001(eng, "queued", finished_at="2025-10-03T00:00:00Z"),
        "long_error": _job_001(
            eng,
            "dead_letter",
            finished_at="2025-10-04T00:00:00Z",
            last_error_code=long_code,
            last_error_message=long_message,
        ),
    }

    command.upgrade(alembic_config(database_url=empty_db_url), "head")

    jobs = {r["id"]: r for r in _rows(eng, "SELECT *, status::text AS s FROM job")}
    assert set(jobs) == set(ids.values())
    assert jobs[ids["terminal_no_finish"]]["s"] == "failed"
    assert jobs[ids["terminal_no_finish"]]["finished_at"] is not None
    assert jobs[ids["retry_stale_finish"]]["s"] == "running"
    assert jobs[ids["retry_stale_finish"]]["finished_at"] is None
    assert jobs[ids["queued_stale_finish"]]["finished_at"] is None
    assert jobs[ids["long_error"]]["last_error_code"] == long_code[:64]
    assert jobs[ids["long_error"]]["last_error_message"] == long_message[:2048]

    events = {
        r["job_id"]: r["detail_json"]
        for r in _rows(
            eng, "SELECT * FROM job_event WHERE detail_json->>'action' = 'migration.normalized'"
        )
    }
    # Only rows that changed were touched, and each kept its original values.
    assert set(events) == {
        ids[k]
        for k in (
            "terminal_no_finish",
            "canceled_no_finish",
            "retry_stale_finish",
            "queued_stale_finish",
            "long_error",
        )
    }
    assert events[ids["terminal_no_finish"]]["original"] == {"finished_at": None}
    assert events[ids["retry_stale_finish"]]["original"]["finished_at"].startswith("2025-10-02")
    assert events[ids["long_error"]]["original"] == {
        "last_error_code": long_code,
        "last_error_message": long_message,
    }

    # The playbook's validation path, with the data in place.
    cfg = alembic_config(database_url=empty_db_url)
    command.downgrade(cfg, "001_job_ledger_init")
    assert {r["id"] for r in _rows(eng, "SELECT id FROM job")} == set(ids.values())
    command.upgrade(cfg, "head")
    assert {r["id"] for r in _rows(eng, "SELECT id FROM job")} == set(ids.values())


def test_hardening_maps_legacy_status_names_left_in_job(empty_db_url: URL, eng: Engine) -> None:
    _at_001(empty_db_url)
    _exec(eng, "ALTER TABLE job DROP CONSTRAINT ck_job_status")  # as some field databases did
    pending = _job_001(eng, "pending")
    completed = _job_001(eng, "completed")

    command.upgrade(alembic_config(database_url=empty_db_url), "3af4686817cc")

    rows = {r["id"]: r for r in _rows(eng, "SELECT id, status::text AS s, finished_at FROM job")}
    assert rows[pending]["s"] == "queued"
    assert rows[completed]["s"] == "succeeded"
    assert rows[completed]["finished_at"] is not None
    originals = {
        r["job_id"]: r["detail_json"]["original"] for r in _rows(eng, "SELECT * FROM job_event")
    }
    assert originals[pending] == {"status": "pending"}
    assert originals[completed]["status"] == "completed"


def test_hardening_refuses_unknown_statuses_before_changing_anything(
    empty_db_url: URL, eng: Engine
) -> None:
    _at_001(empty_db_url)
    _exec(eng, "ALTER TABLE job DROP CONSTRAINT ck_job_status")
    _job_001(eng, "stuck")
    _job_001(eng, "terminal")
    _job_001(eng, "terminal")
    _job_001(eng, "failed")  # would be normalised: must not be
    before = _snapshot(eng)
    rows_before = _rows(eng, "SELECT * FROM job ORDER BY id")

    with pytest.raises(DBAPIError) as info:
        command.upgrade(alembic_config(database_url=empty_db_url), "head")

    message = str(info.value.orig)
    assert "'stuck' (1 rows)" in message
    assert "'terminal' (2 rows)" in message
    assert _snapshot(eng) == before
    assert _rows(eng, "SELECT * FROM job ORDER BY id") == rows_before
    assert _rows(eng, "SELECT count(*) AS n FROM job_event") == [{"n": 0}]


def test_downgrade_keeps_every_row_and_non_default_retry_settings(
    db_url: URL,
) -> None:
    engine = create_engine(db_url)
    _exec(
        engine,
        "INSERT INTO job (org_id, type, max_attempts, backoff_policy) "
        "VALUES (gen_random_uuid(), 'noop', 9, 'fixed'), (gen_random_uuid(), 'noop', 5, 'exp')",
    )
    cfg = alembic_config(database_url=db_url)
    command.downgrade(cfg, "001_job_ledger_init")
    assert _rows(engine, "SELECT count(*) AS n FROM job") == [{"n": 2}]
    kept = _rows(
        engine,
        "SELECT detail_json FROM job_event WHERE detail_json->>'action' = 'migration.downgraded'",
    )
    dropped = [k["detail_json"]["dropped"] for k in kept]
    # Both jobs were queued: passing b8e2d4f6a1c3 gave each an outbox message due at its run_at,
    # and 4c2f9a1e7b3d's downgrade kept those pending deliveries.
    assert sorted(list(d) for d in dropped if "pending_deliveries" in d) == [
        ["pending_deliveries"],
        ["pending_deliveries"],
    ]
    assert [d for d in dropped if "pending_deliveries" not in d] == [
        {"max_attempts": 9, "backoff_policy": "fixed"}
    ]
    assert _rows(
        engine,
        "SELECT count(*) AS n FROM pg_type WHERE typname IN ('job_status', 'job_backoff_policy')",
    ) == [{"n": 0}]
    command.upgrade(cfg, "head")
    assert _rows(engine, "SELECT count(*) AS n FROM job") == [{"n": 2}]
    engine.dispose()


def test_bad_legacy_org_id_is_refused(empty_db_url: URL) -> None:
    from argparse import Namespace

    cfg = alembic_config(database_url=empty_db_url)
    cfg.cmd_opts = Namespace(x=["legacy_org_id=not-a-uuid"])
    with pytest.raises((ValueError, CommandError), match="legacy_org_id must be a UUID"):
        command.upgrade(cfg, "head")
