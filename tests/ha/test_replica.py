"""Reads that accept lag on a real streaming replica (pg_basebackup -R of a throwaway primary),
replay paused (`pg_wal_replay_pause()`) to make it lag."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from alembic import command
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from heimdex.cli import main
from heimdex.db import make_engine, server_address
from heimdex.ledger import service
from heimdex.ledger.registry import load_registry
from heimdex.replica import ReadEngines
from heimdex.settings import Settings
from heimdex_api.app import create_app
from heimdex_api.auth import ADMIN_ROLE, issue_token
from heimdex_db import localpg
from heimdex_db.localpg import LocalPostgres
from tests.conftest import alembic_cfg
from tests.stack import FAST, SECRET, wait_for


@dataclass
class Replicated:
    primary: URL
    replica: URL

    def admin(self, url: URL) -> Engine:
        return create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="module")
def replicated() -> Iterator[Replicated]:
    primary = LocalPostgres.throwaway().start()
    replica = LocalPostgres.throwaway()
    try:
        url = primary.create_database("heimdex")
        command.upgrade(alembic_cfg(url), "head")
        replica._chown(replica.socket_dir)
        primary._run(
            "pg_basebackup", "-D", str(replica.datadir), "-h", "127.0.0.1",
            "-p", str(primary.port), "-U", localpg.SUPERUSER, "-R", "-X", "stream", "-c", "fast",
        )  # fmt: skip
        replica.start()
        yield Replicated(url, replica.url("heimdex"))
    finally:
        replica.destroy()
        primary.destroy()


@pytest.fixture
def paused(replicated: Replicated) -> Iterator[Replicated]:
    """The replica with replay paused: what it shows stops at the pause."""
    admin = replicated.admin(replicated.replica)
    with admin.connect() as conn:
        conn.execute(text("SELECT pg_wal_replay_pause()"))
    try:
        yield replicated
    finally:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_wal_replay_resume()"))
        admin.dispose()


def submit(url: URL, org_id: uuid.UUID) -> uuid.UUID:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            (done,) = service.submit_jobs(
                conn, load_registry(), org_id=org_id, specs=[service.JobSpec("noop", {})]
            )
    finally:
        engine.dispose()
    job_id: uuid.UUID = done.job.id
    return job_id


def test_reads_fall_back_to_the_primary_while_the_replica_lags_or_is_down(
    paused: Replicated, caplog: pytest.LogCaptureFixture
) -> None:
    primary, replica = make_engine(paused.primary), make_engine(paused.replica)
    reads = ReadEngines(primary, replica, max_lag_seconds=0.5, check_every=0)
    down = ReadEngines(
        primary,
        make_engine(f"postgresql://postgres@127.0.0.1:{localpg.free_port()}/heimdex"),
        max_lag_seconds=30,
    )
    try:
        submit(paused.primary, uuid.uuid4())  # received by the replica, not replayed
        with caplog.at_level(logging.WARNING, logger="heimdex.replica"):
            wait_for(lambda: reads.engine() is primary, what="the fallback past the lag bound")
            assert reads.lag is not None and reads.lag > 0.5
            assert down.engine() is primary and down.lag is None
        fallbacks = [r for r in caplog.records if getattr(r, "action", "") == "replica.fallback"]
        assert len(fallbacks) == 2, [r.getMessage() for r in fallbacks]
        admin = paused.admin(paused.replica)
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_wal_replay_resume()"))
        admin.dispose()
        wait_for(lambda: reads.engine() is replica, what="reads back on the caught-up replica")
        with reads.connect() as conn:
            assert server_address(conn).endswith(f":{paused.replica.port}")
    finally:
        for engine in (primary, replica, down.replica):
            if engine is not None:
                engine.dispose()


def test_operator_reads_go_to_the_replica_and_acts_to_the_primary(
    paused: Replicated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With replay paused (and a lag bound it stays within), a job submitted on the primary is
    missing from the lists read on the replica, and found by what stays on the primary."""
    org = uuid.uuid4()
    env = {
        **FAST,
        "DATABASE_URL": paused.primary.render_as_string(hide_password=False),
        "HEIMDEX_READ_DATABASE_URL": paused.replica.render_as_string(hide_password=False),
        "HEIMDEX_READ_MAX_LAG_SECONDS": "3600",
        "HEIMDEX_ENV": "local",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    job_id = submit(paused.primary, org)

    listed = CliRunner().invoke(main, ["jobs", "list", "--org", str(org), "--json"])
    assert listed.exit_code == 0, listed.output
    assert str(job_id) not in listed.output
    stats = CliRunner().invoke(main, ["jobs", "stats", "--org", str(org), "--json"])
    assert stats.exit_code == 0, stats.output
    assert '"queued": 1' not in stats.output
    shown = CliRunner().invoke(main, ["jobs", "show", str(job_id), "--json"])
    assert shown.exit_code == 0, shown.output
    assert str(job_id) in shown.output

    token = issue_token(SECRET, org_id=org, sub="op", role=ADMIN_ROLE)
    operator = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(Settings()), raise_server_exceptions=False) as client:
        page = client.get("/ops/jobs", params={"org_id": str(org)}, headers=operator)
        one = client.get(f"/ops/jobs/{job_id}", headers=operator)
        lag = client.get("/metrics").text
        signed_in = client.post("/ui/signin", data={"token": token}, follow_redirects=False)
        assert signed_in.status_code == 303, signed_in.text
        overview = client.get("/ui").text
        ui_jobs = client.get("/ui/jobs", params={"org": str(org)}).text
        ui_job = client.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200, page.text
    assert [item["id"] for item in page.json()["items"]] == []
    assert one.status_code == 200, one.text
    assert "heimdex_replica_lag_seconds" in lag
    assert "read replica" in overview and "behind: reading it" in overview
    assert str(job_id) not in ui_jobs
    assert ui_job.status_code == 200 and str(job_id) in ui_job.text
