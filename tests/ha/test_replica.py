"""Reads that accept lag on a real streaming replica (pg_basebackup -R of a throwaway primary),
replay paused (`pg_wal_replay_pause()`) to make it lag."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from click.testing import CliRunner
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from heimdex.cli import main
from heimdex.db import make_engine, server_address
from heimdex.ledger import service
from heimdex.ledger.registry import load_registry
from heimdex.ledger.repository import queue_stats
from heimdex.replica import ReadEngines
from heimdex.settings import Settings
from heimdex_api.app import create_app
from heimdex_api.auth import ADMIN_ROLE, issue_token
from heimdex_db import localpg
from heimdex_db.localpg import LocalPostgres
from tests.conftest import alembic_cfg
from tests.stack import FAST, SECRET, ThreadWorkers, wait_for

pytestmark = pytest.mark.slow  # a primary and a streaming replica of their own


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


def submit(url: URL, org_id: uuid.UUID, run_at: datetime | None = None) -> uuid.UUID:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            (done,) = service.submit_jobs(
                conn,
                load_registry(),
                org_id=org_id,
                specs=[service.JobSpec("noop", {}, run_at=run_at)],
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


def queued(url: URL) -> float:
    """Queued noop jobs as the server of `url` shows them."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return float(sum(s.queued for s in queue_stats(conn) if s.type == "noop"))
    finally:
        engine.dispose()


def scrape_queued(port: int) -> float | None:
    """`heimdex_queue_jobs{type="noop"}` on a worker's /metrics; None until it answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    for family in text_string_to_metric_families(body):
        if family.name == "heimdex_queue_jobs":
            return sum(s.value for s in family.samples if s.labels["type"] == "noop")
    return None


def drained(replicated: Replicated, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the due jobs on the primary, then wait for the replica to replay all of it: from
    here on, only a submit changes the queue."""
    monkeypatch.setenv("DATABASE_URL", replicated.primary.render_as_string(hide_password=False))
    workers = ThreadWorkers(Settings())
    workers.start()
    try:
        primary = make_engine(replicated.primary)
        with primary.connect() as conn:
            wait_for(
                lambda: not any(s.due or s.running for s in queue_stats(conn)),
                what="the primary's due jobs run",
            )
            conn.commit()
    finally:
        workers.stop_all()
    with primary.connect() as conn:
        lsn = conn.execute(text("SELECT pg_current_wal_lsn()")).scalar_one()
    primary.dispose()
    replica = make_engine(replicated.replica)
    with replica.connect() as conn:
        caught_up = text("SELECT pg_last_wal_replay_lsn() >= CAST(:lsn AS pg_lsn)")
        wait_for(
            lambda: conn.execute(caught_up, {"lsn": lsn}).scalar_one(),
            what="the replica's replay",
        )
    replica.dispose()


def test_worker_queue_gauges_read_the_replica_within_the_lag_bound(
    replicated: Replicated, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With replay paused, a job submitted on the primary (a day ahead, so no worker claims
    it): a worker within its lag bound counts the replica's jobs, one past it falls back to the
    primary's and says so."""
    env = {
        **FAST,
        "DATABASE_URL": replicated.primary.render_as_string(hide_password=False),
        "HEIMDEX_READ_DATABASE_URL": replicated.replica.render_as_string(hide_password=False),
        "HEIMDEX_ENV": "local",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    within, past = localpg.free_port(), localpg.free_port()
    monkeypatch.setenv("HEIMDEX_READ_MAX_LAG_SECONDS", "3600")
    monkeypatch.setenv("HEIMDEX_WORKER_METRICS_PORT", str(within))
    lenient = Settings()
    monkeypatch.setenv("HEIMDEX_READ_MAX_LAG_SECONDS", "0.5")
    monkeypatch.setenv("HEIMDEX_WORKER_METRICS_PORT", str(past))
    strict = Settings()
    monkeypatch.delenv("HEIMDEX_READ_DATABASE_URL")
    monkeypatch.delenv("HEIMDEX_WORKER_METRICS_PORT")
    drained(replicated, monkeypatch)

    admin = replicated.admin(replicated.replica)
    with admin.connect() as conn:
        conn.execute(text("SELECT pg_wal_replay_pause()"))
    workers = ThreadWorkers(lenient)
    try:
        submit(replicated.primary, uuid.uuid4(), run_at=datetime.now(UTC) + timedelta(days=1))
        on_replica, on_primary = queued(replicated.replica), queued(replicated.primary)
        assert on_primary == on_replica + 1
        with caplog.at_level(logging.INFO, logger="heimdex.replica"):
            workers.start(lenient)
            workers.start(strict)
            wait_for(lambda: scrape_queued(within) is not None, what="the worker's /metrics")
            assert scrape_queued(within) == on_replica
            wait_for(lambda: scrape_queued(past) == on_primary, what="the fallback's gauges")
        fallbacks = [r for r in caplog.records if getattr(r, "action", "") == "replica.fallback"]
        assert len(fallbacks) == 1, [r.getMessage() for r in fallbacks]
        assert "reads go to the primary" in fallbacks[0].getMessage()
    finally:
        workers.stop_all()
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_wal_replay_resume()"))
        admin.dispose()
