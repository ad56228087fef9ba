"""Revision 4c2f9a1e7b3d on databases in the field: upstream-hardened ones converge, and a
downgrade keeps what it drops."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from alembic import command
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from heimdex_db.config import alembic_config
from heimdex_db.verify.schema import render_diff, snapshot

REVISION, BEFORE = "4c2f9a1e7b3d", "3af4686817cc"


@pytest.fixture
def eng(empty_db_url: URL) -> Iterator[Engine]:
    engine = create_engine(empty_db_url)
    yield engine
    engine.dispose()


def test_upstream_hardened_database_converges_to_head(
    empty_db_url: URL, db_url: URL, eng: Engine
) -> None:
    cfg = alembic_config(database_url=empty_db_url)
    command.upgrade(cfg, BEFORE)
    with eng.begin() as conn:
        conn.execute(text("CREATE INDEX idx_job__job_org_id ON job (org_id)"))
        conn.execute(
            text(
                "ALTER TABLE job ADD CONSTRAINT ck_job_status CHECK (status IN "
                "('queued','running','succeeded','failed','canceled','dead_letter'))"
            )
        )
    command.upgrade(cfg, "head")
    with eng.connect() as conn:
        upstream = snapshot(conn)
    head_engine = create_engine(db_url)
    with head_engine.connect() as conn:
        ours = snapshot(conn)
    head_engine.dispose()
    assert upstream == ours, render_diff(ours, upstream)
    with eng.connect() as conn:
        rls = conn.execute(
            text("SELECT relrowsecurity FROM pg_class WHERE relname = 'job'")
        ).scalar()
    assert rls is True


def test_existing_jobs_get_defaults_and_downgrade_records_dropped_values(
    empty_db_url: URL, eng: Engine
) -> None:
    cfg = alembic_config(database_url=empty_db_url)
    command.upgrade(cfg, BEFORE)
    old_job, new_job, plain_job = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    org = uuid.uuid4()
    with eng.begin() as conn:
        conn.execute(
            text("INSERT INTO job (id, org_id, type) VALUES (:id, :org, 'mock_process')"),
            {"id": old_job, "org": org},
        )
    command.upgrade(cfg, REVISION)
    with eng.begin() as conn:
        row = conn.execute(
            text("SELECT params, progress, cancel_requested FROM job WHERE id = :id"),
            {"id": old_job},
        ).one()
        assert (row.params, row.progress, row.cancel_requested) == ({}, 0, False)
        conn.execute(
            text(
                "INSERT INTO job (id, org_id, type, params, request_fingerprint, stage, "
                "progress, result) VALUES (:id, :org, 'mock_process', CAST(:p AS jsonb), "
                "'ab', 'indexing', 100, CAST(:r AS jsonb))"
            ),
            {"id": new_job, "org": org, "p": json.dumps({"x": 1}), "r": json.dumps({"ok": 1})},
        )
        conn.execute(
            text("INSERT INTO job (id, org_id, type) VALUES (:id, :org, 'noop')"),
            {"id": plain_job, "org": org},
        )
        conn.execute(text("INSERT INTO job_outbox (job_id) VALUES (:id)"), {"id": plain_job})
    command.downgrade(cfg, BEFORE)
    with eng.connect() as conn:
        events = {
            r.job_id: r.detail_json
            for r in conn.execute(
                text(
                    "SELECT job_id, detail_json FROM job_event "
                    "WHERE detail_json->>'action' = 'migration.downgraded'"
                )
            )
        }
    assert old_job not in events
    assert events[new_job]["revision"] == REVISION
    assert events[new_job]["dropped"] == {
        "params": {"x": 1},
        "request_fingerprint": "ab",
        "stage": "indexing",
        "progress": 100,
        "result": {"ok": 1},
    }
    assert list(events[plain_job]["dropped"]) == ["pending_deliveries"]
    command.upgrade(cfg, "head")
