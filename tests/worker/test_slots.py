"""A worker's connections are a small fixed number whatever its concurrency: a slot is a thread,
not a connection. On a server that accepts 25 connections, a worker of 100 slots runs 100 long
jobs at once and 300 short ones beside them; the connections are split into lanes, so handlers
waiting for theirs never hold up a claim or an outcome."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from alembic import command
from pydantic import BaseModel
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from heimdex.db import make_engine
from heimdex.ledger import builtin, repository, service
from heimdex.ledger.registry import JobContext, JobTypes, Registry
from heimdex.ledger.repository import NewJob
from heimdex.metrics import LedgerMetrics
from heimdex.settings import MIN_WORKER_DB_CONNECTIONS, Settings
from heimdex_db.config import alembic_config
from heimdex_db.localpg import LocalPostgres
from heimdex_worker.db import Budget
from heimdex_worker.metrics import WorkerMetrics
from heimdex_worker.runtime import Worker
from tests.stack import Processes, wait_for

TYPES = "tests.worker.slots_types:jobs"
MAX_CONNECTIONS = 25
WORKER_CONNECTIONS = 10
CONCURRENCY = 100
QUICK = 300
NAPS = 100


@pytest.fixture
def small_server() -> Iterator[URL]:
    """A cluster of its own that accepts MAX_CONNECTIONS connections."""
    pg = LocalPostgres.throwaway(max_connections=MAX_CONNECTIONS).start()
    try:
        url = pg.create_database("ledger")
        command.upgrade(alembic_config(database_url=url), "head")
        yield url
    finally:
        pg.destroy()


def _submit(engine: Engine, type_: str, n: int) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        repository.insert_jobs(conn, [NewJob(org, type_, {}, None)] * n)


SAMPLE = text(
    "SELECT (SELECT count(*) FROM pg_stat_activity"
    "        WHERE datname = current_database() AND pid <> pg_backend_pid()"
    "          AND backend_type = 'client backend') AS connections,"
    "       count(*) FILTER (WHERE type = 'nap' AND status = 'running') AS napping,"
    "       count(*) FILTER (WHERE status = 'succeeded') AS succeeded"
    "  FROM job"
)


@pytest.mark.slow
def test_a_worker_of_100_slots_holds_a_fixed_number_of_connections(
    small_server: URL, processes: Processes
) -> None:
    engine = make_engine(small_server, pool_size=1, max_overflow=0)
    try:
        _submit(engine, "nap", NAPS)
        _submit(engine, "quick", QUICK)
        worker = processes.start(
            "worker", "--concurrency", str(CONCURRENCY), "--batch", "10",
            env={
                "DATABASE_URL": small_server.render_as_string(hide_password=False),
                "HEIMDEX_JOB_MODULES": TYPES,
                "HEIMDEX_WORKER_DB_CONNECTIONS": str(WORKER_CONNECTIONS),
            },
        )  # fmt: skip
        most_connections = most_napping = succeeded = 0
        deadline = time.monotonic() + 180  # guards against a hung test only
        while succeeded < NAPS + QUICK and worker.poll() is None and time.monotonic() < deadline:
            with engine.connect() as conn:
                row = conn.execute(SAMPLE).one()
            most_connections = max(most_connections, row.connections)
            most_napping = max(most_napping, row.napping)
            succeeded = row.succeeded
            time.sleep(0.02)
        log = processes.log_of(worker)
        assert worker.poll() is None, f"the worker exited:\n{log[-3000:]}"
        assert "too many clients" not in log
        assert f'"db_connections": {WORKER_CONNECTIONS}' in log  # said at start
        assert succeeded == NAPS + QUICK, f"{succeeded} jobs done:\n{log[-3000:]}"
        # Every long job held a slot at the same time, the whole worker at most its connections.
        assert most_napping == NAPS
        assert 0 < most_connections <= WORKER_CONNECTIONS
        with engine.connect() as conn:
            runs = conn.execute(
                text(
                    "SELECT count(*), count(DISTINCT job_id) FROM job_event"
                    " WHERE next_status = 'succeeded'"
                )
            ).one()
        assert tuple(runs) == (NAPS + QUICK, NAPS + QUICK)
    finally:
        engine.dispose()


@pytest.mark.parametrize("total", [MIN_WORKER_DB_CONNECTIONS, 10, 100])
@pytest.mark.parametrize(("concurrency", "batch"), [(1, 1), (4, 10), (4, 1), (100, 4), (1000, 1)])
def test_the_budget_spends_every_connection_and_leaves_each_lane_one(
    total: int, concurrency: int, batch: int
) -> None:
    budget = Budget.of(total, concurrency=concurrency, batch=batch)
    # The LISTEN connection, the keeper's, the outcome writer's, the engine's spare.
    assert budget.claims + budget.attempts + budget.handlers + 4 == total == budget.pool_size + 1
    assert min(budget.claims, budget.attempts, budget.handlers) >= 1
    assert budget.claims <= min(concurrency, -(-concurrency // batch) + 1)


class Empty(BaseModel):
    pass


def _submit_one(engine: Engine, registry: Registry, org: uuid.UUID, type_: str) -> str:
    with engine.begin() as conn:
        submitted = service.submit_job(
            conn, registry, org_id=org, spec=service.JobSpec(type=type_, params={})
        )
    return str(submitted.job.id)


def _status(engine: Engine, job_id: str) -> str:
    with engine.connect() as conn:
        status: str = conn.execute(
            text("SELECT status FROM job WHERE id = :id"), {"id": job_id}
        ).scalar_one()
    return status


def test_claims_and_outcomes_go_on_while_every_attempt_connection_is_taken(
    settings: Settings, engine: Engine, org_id: uuid.UUID
) -> None:
    types = JobTypes()
    staging = threading.Event()

    @types.register("stager", params=Empty)
    def stager(ctx: JobContext, params: Empty) -> dict[str, Any]:
        staging.set()
        ctx.stage("one", 50)  # waits for a connection of the attempts' lane
        return {}

    registry = Registry([("builtin", builtin.jobs), ("tests", types)])
    worker = Worker(
        settings,
        engine,
        registry,
        session_engine=engine,
        worker_id=f"test-{uuid.uuid4()}",
        concurrency=2,
        batch=1,
        metrics=WorkerMetrics(LedgerMetrics(engine)),
    )
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    try:
        with contextlib.ExitStack() as taken:
            for _ in range(worker.budget.attempts):
                taken.enter_context(worker.lanes.attempts.autocommit())
            thread.start()
            staged = _submit_one(engine, registry, org_id, "stager")
            assert staging.wait(30)
            # The other slot claims, runs and writes the outcome of a job meanwhile.
            quick = _submit_one(engine, registry, org_id, "noop")
            wait_for(lambda: _status(engine, quick) == "succeeded", what="the no-op job")
            assert _status(engine, staged) == "running"
        wait_for(lambda: _status(engine, staged) == "succeeded", what="the stage written")
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()


def test_a_handlers_own_connection_comes_from_its_lane_and_what_it_left_open_is_rolled_back(
    settings: Settings, engine: Engine, org_id: uuid.UUID
) -> None:
    types = JobTypes()
    seen: list[tuple[int, bool]] = []

    @types.register("writer", params=Empty)
    def writer(ctx: JobContext, params: Empty) -> dict[str, Any]:
        with ctx.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            conn.execute(text("CREATE TABLE IF NOT EXISTS left_open (n int)"))
            conn.commit()
            conn.execute(text("INSERT INTO left_open VALUES (1)"))  # never committed
            seen.append((pid, conn.connection.driver_connection.autocommit))
        return {}

    registry = Registry([("builtin", builtin.jobs), ("tests", types)])
    worker = Worker(
        settings.model_copy(update={"worker_db_connections": MIN_WORKER_DB_CONNECTIONS}),
        engine,
        registry,
        session_engine=engine,
        worker_id=f"test-{uuid.uuid4()}",
        concurrency=2,
        batch=1,
        metrics=WorkerMetrics(LedgerMetrics(engine)),
    )
    assert worker.budget.handlers == 1
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        jobs = [_submit_one(engine, registry, org_id, "writer") for _ in range(2)]
        for job in jobs:
            wait_for(lambda job=job: _status(engine, job) == "succeeded", what="the writer")
    finally:
        stop.set()
        thread.join()
    # One connection of the lane served both, in a transaction of the handler's own each time.
    assert [autocommit for _, autocommit in seen] == [False, False]
    assert seen[0][0] == seen[1][0]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM left_open")).scalar_one() == 0
