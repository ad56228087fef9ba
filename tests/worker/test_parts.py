"""The worker's parts in this process, on a real database: the outcome writer, the keeper
(heartbeat, reaper, retention slice) and the listener, each built with the test's engine."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from heimdex.db import make_engine
from heimdex.ledger import repository, service
from heimdex.ledger.registry import Registry
from heimdex.ledger.repository import ClaimedJob, NewJob
from heimdex.metrics import LedgerMetrics
from heimdex.models import JobStatus
from heimdex.settings import Settings
from heimdex_worker.db import Lane
from heimdex_worker.held import Done, HeldJobs
from heimdex_worker.keeper import Keeper
from heimdex_worker.listener import listen
from heimdex_worker.metrics import WorkerMetrics
from heimdex_worker.outcomes import OutcomeWriter
from tests.stack import wait_for

POLICY = service.RetryPolicy(base_seconds=0.05, max_seconds=0.05)


def _submit(engine: Engine, org_id: uuid.UUID, n: int = 1) -> list[uuid.UUID]:
    with engine.begin() as conn:
        rows = repository.insert_jobs(conn, [NewJob(org_id, "noop", {}, None)] * n)
    return [r.id for r in rows]


def _claim(engine: Engine, limit: int, lease_seconds: float = 30.0) -> list[ClaimedJob]:
    with engine.begin() as conn:
        return repository.claim(
            conn, worker_id="test", limit=limit, lease_seconds=lease_seconds
        ).jobs


def _status(engine: Engine, job_id: uuid.UUID) -> JobStatus:
    with engine.connect() as conn:
        status: JobStatus = repository.get_job(conn, job_id).status
    return status


def _sample(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    value = metrics.ledger.registry.get_sample_value(name, labels)
    return value or 0.0


@pytest.fixture
def metrics(engine: Engine) -> WorkerMetrics:
    return WorkerMetrics(LedgerMetrics(engine))


@pytest.fixture
def held() -> HeldJobs:
    return HeldJobs()


@pytest.fixture
def lane(engine: Engine) -> Iterator[Lane]:
    lane = Lane(engine, 1)
    yield lane
    lane.close()


@pytest.fixture
def writer(lane: Lane, held: HeldJobs, metrics: WorkerMetrics) -> OutcomeWriter:
    return OutcomeWriter(lane, held, policy=POLICY, metrics=metrics)


def _ended(held: HeldJobs, jobs: list[ClaimedJob]) -> list[Done]:
    return [(h, service.succeeded(h.job, {"ok": True}), "succeeded") for h in held.hold(jobs)]


def test_the_writer_writes_parked_outcomes_in_one_flush_and_forgets_them(
    engine: Engine, org_id: uuid.UUID, held: HeldJobs, writer: OutcomeWriter, metrics: WorkerMetrics
) -> None:
    _submit(engine, org_id, 3)
    jobs = _claim(engine, 3)
    first, second = writer.parking(), writer.parking()
    done = _ended(held, jobs)
    writer.park(first, done[0])
    writer.park(second, done[1])
    writer.park(second, done[2])
    assert len(held) == 3

    # The keeper's way: what every runner parked, in one write.
    writer.flush(writer.unpark_all(), keeper=True)

    assert [_status(engine, j.id) for j in jobs] == [JobStatus.SUCCEEDED] * 3
    assert len(held) == 0 and not writer.waiting
    assert writer.unpark(first) == [] and writer.unpark(second) == []
    counted = _sample(
        metrics,
        "heimdex_job_transitions_total",
        type="noop",
        from_status="running",
        to_status="succeeded",
    )
    assert counted == 3


def test_a_failed_attempt_is_retried_by_the_rule_and_a_lost_lease_writes_nothing(
    engine: Engine, org_id: uuid.UUID, held: HeldJobs, writer: OutcomeWriter, metrics: WorkerMetrics
) -> None:
    _submit(engine, org_id, 2)
    failing, lost = held.hold(_claim(engine, 2))
    # The second job's lease is taken from it (as the reaper would): its outcome is void.
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE job SET lease_token = gen_random_uuid() WHERE id = :id"),
            {"id": lost.job.id},
        )
    failure = service.Failure(failing.job.id, failing.token, "BOOM", "it broke", retryable=True)
    writer.flush(
        [
            (failing, failure, "failed"),
            (lost, service.succeeded(lost.job, {}), "succeeded"),
        ]
    )

    with engine.connect() as conn:
        row = repository.get_job(conn, failing.job.id)
    assert (row.status, row.attempt, row.last_error_code) == (JobStatus.QUEUED, 1, "BOOM")
    assert _status(engine, lost.job.id) is JobStatus.RUNNING
    assert len(held) == 0
    assert (
        _sample(
            metrics, "heimdex_job_attempt_duration_seconds_count", type="noop", outcome="lease_lost"
        )
        == 1
    )


def test_the_keepers_write_through_an_outage_puts_the_outcomes_back(
    engine: Engine, db_url: URL, admin_engine: Engine, held: HeldJobs, metrics: WorkerMetrics
) -> None:
    _submit(engine, uuid.uuid4())
    done = _ended(held, _claim(engine, 1))
    job_id = done[0][0].job.id
    # The writer's own engine, on a database that refuses new connections for a while.
    own = make_engine(db_url)
    lane = Lane(own, 1)
    writer = OutcomeWriter(lane, held, policy=POLICY, metrics=metrics)
    allow = f'ALTER DATABASE "{db_url.database}" WITH ALLOW_CONNECTIONS'
    try:
        with admin_engine.connect() as admin:
            admin.execute(text(f"{allow} false"))
        writer.flush(done, keeper=True)  # one try: a heartbeat never waits on an outage
        assert writer.waiting and len(held) == 1
        with admin_engine.connect() as admin:
            admin.execute(text(f"{allow} true"))

        writer.flush([], keeper=True)  # the next tick writes what was put back

        assert not writer.waiting and len(held) == 0
        assert _status(engine, job_id) is JobStatus.SUCCEEDED
    finally:
        with admin_engine.connect() as admin:
            admin.execute(text(f"{allow} true"))
        lane.close()
        own.dispose()


@pytest.fixture
def keeper_parts(
    settings: Settings,
    engine: Engine,
    held: HeldJobs,
    writer: OutcomeWriter,
    metrics: WorkerMetrics,
) -> Iterator[tuple[Keeper, threading.Event, threading.Event]]:
    finish, wake = threading.Event(), threading.Event()
    keeper = Keeper(
        settings,
        Lane(engine, 1),
        held,
        writer,
        policy=POLICY,
        metrics=metrics,
        archive=None,
        finish=finish,
        wake=wake,
        retention_engine=engine,
        registry=Registry([]),
    )
    yield keeper, finish, wake
    finish.set()
    keeper.lane.close()


def _thread(keeper: Keeper) -> threading.Thread:
    """The keeper on a thread of its own, as in the worker."""
    return threading.Thread(target=keeper.run)


def _lease_expires(engine: Engine, job_id: uuid.UUID) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT lease_expires_at FROM job WHERE id = :id"), {"id": job_id}
        ).scalar_one()


def test_the_keeper_renews_held_leases_and_flags_the_ones_lost(
    engine: Engine,
    org_id: uuid.UUID,
    held: HeldJobs,
    keeper_parts: tuple[Keeper, threading.Event, threading.Event],
) -> None:
    keeper, finish, _ = keeper_parts
    _submit(engine, org_id, 2)
    kept, lost = held.hold(_claim(engine, 2, lease_seconds=keeper.settings.lease_seconds))
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE job SET lease_token = gen_random_uuid() WHERE id = :id"),
            {"id": lost.job.id},
        )
    first = _lease_expires(engine, kept.job.id)
    thread = _thread(keeper)
    thread.start()
    try:
        wait_for(lambda: _lease_expires(engine, kept.job.id) > first, what="a renewed lease")
        wait_for(lambda: lost.lost, what="the lost lease flagged")
        assert not kept.lost
    finally:
        finish.set()
        thread.join()
    # Held for longer than the lease itself: renewed all along.
    assert _status(engine, kept.job.id) is JobStatus.RUNNING


def test_the_keeper_writes_outcomes_a_runner_left_parked(
    engine: Engine,
    org_id: uuid.UUID,
    held: HeldJobs,
    writer: OutcomeWriter,
    keeper_parts: tuple[Keeper, threading.Event, threading.Event],
) -> None:
    keeper, finish, _ = keeper_parts
    _submit(engine, org_id)
    (done,) = _ended(held, _claim(engine, 1))
    writer.park(writer.parking(), done)
    thread = _thread(keeper)
    thread.start()
    try:
        wait_for(lambda: len(held) == 0, what="the parked outcome written")
    finally:
        finish.set()
        thread.join()
    assert _status(engine, done[0].job.id) is JobStatus.SUCCEEDED


def test_the_reaper_requeues_expired_leases_and_wakes_the_runners(
    engine: Engine,
    org_id: uuid.UUID,
    metrics: WorkerMetrics,
    keeper_parts: tuple[Keeper, threading.Event, threading.Event],
) -> None:
    keeper, _, wake = keeper_parts
    (job_id,) = _submit(engine, org_id)
    _claim(engine, 1, lease_seconds=0.0)  # a worker that died holding it

    keeper.reap()

    with engine.connect() as conn:
        row = repository.get_job(conn, job_id)
    assert (row.status, row.attempt, row.last_error_code) == (
        JobStatus.QUEUED,
        1,
        "LEASE_EXPIRED",
    )
    assert wake.is_set()
    assert _sample(metrics, "heimdex_leases_reaped_total") == 1


def test_a_retention_slice_deletes_finished_jobs_past_their_age(
    engine: Engine,
    org_id: uuid.UUID,
    held: HeldJobs,
    writer: OutcomeWriter,
    keeper_parts: tuple[Keeper, threading.Event, threading.Event],
) -> None:
    keeper, _, _ = keeper_parts
    old, recent = _submit(engine, org_id, 2)
    writer.flush(_ended(held, _claim(engine, 2)))
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE job SET finished_at = now() - interval '60 days' WHERE id = :id"),
            {"id": old},
        )

    # Slices until one finds nothing old left (each stops after its share of a heartbeat).
    wait_for(lambda: keeper.prune(engine), what="a retention slice that completes")

    with engine.connect() as conn:
        left = set(conn.execute(text("SELECT id FROM job")).scalars())
    assert left == {recent}


def _listening(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    f" AND query = 'LISTEN {repository.NOTIFY_CHANNEL}'"
                )
            ).scalar_one()
        )


def test_the_listener_wakes_on_notify_and_listens_again_after_losing_its_connection(
    engine: Engine,
) -> None:
    finish, wake = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=listen, args=(engine.url,), kwargs={"finish": finish, "wake": wake}
    )
    thread.start()
    try:
        wait_for(lambda: _listening(engine) == 1, what="the listener's LISTEN")
        wait_for(wake.is_set, what="the wake-up on connecting")
        wake.clear()
        with engine.begin() as conn:
            repository.notify(conn)
        wait_for(wake.is_set, what="the wake-up on NOTIFY")

        wake.clear()
        with engine.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND query LIKE 'LISTEN %'"
                )
            )
        # Connected again: it looks once, for what was sent while it was not listening.
        wait_for(wake.is_set, what="the wake-up on reconnecting")
        wait_for(lambda: _listening(engine) == 1, what="the listener's LISTEN again")
    finally:
        finish.set()
        thread.join()
