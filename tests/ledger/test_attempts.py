"""What counts as an attempt when a lease expires: an attempt that began (its handler started)
is charged by the retry rule; a job its worker only prefetched returns to the queue with its
budget intact. On real PostgreSQL, in process; the worker's side is in
tests/queue/test_attempts.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Connection, Engine

from heimdex.ledger import repository, service
from heimdex.ledger.registry import Registry, load_registry
from heimdex.models import JobStatus

POLICY = service.RetryPolicy(base_seconds=10.0, max_seconds=60.0)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


@pytest.fixture
def conn(engine: Engine) -> Iterator[Connection]:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        yield conn


def _submit(conn: Connection, registry: Registry, org: uuid.UUID, max_attempts: int) -> uuid.UUID:
    spec = service.JobSpec("noop", {}, max_attempts=max_attempts)
    return service.submit_job(conn, registry, org_id=org, spec=spec).job.id


def _actions(conn: Connection, job_id: uuid.UUID) -> list[str]:
    return [(e.detail_json or {}).get("action") for e in repository.list_events(conn, job_id)]


def _reap(conn: Connection) -> dict[uuid.UUID, repository.Outcome]:
    with conn.begin():
        reaped = service.reap_expired_leases(conn, policy=POLICY, stale_after_seconds=60)
    return {o.job_id: o for o in reaped}


def test_an_expired_lease_charges_a_started_attempt_and_not_a_prefetched_job(
    engine: Engine, registry: Registry, org_id: uuid.UUID
) -> None:
    with engine.connect() as conn:
        started, waiting, waiting_canceled = (
            _submit(conn, registry, org_id, max_attempts=1) for _ in range(3)
        )
        conn.commit()
        # One worker claims the three (a batch), starts the first and holds the other two
        # unstarted behind it; then it is lost, and every lease expires.
        claimed = {
            j.id: j
            for j in repository.claim(conn, worker_id="lost", limit=3, lease_seconds=0.0).jobs
        }
        recorded = repository.record_prefetched(
            conn, [(i, claimed[i].lease_token) for i in (waiting, waiting_canceled)]
        )
        assert recorded == {waiting, waiting_canceled}
        service.cancel_job(conn, org_id=org_id, job_id=waiting_canceled)
        conn.commit()

        reaped = _reap(conn)
        assert {i: (o.status, o.attempt) for i, o in reaped.items()} == {
            started: (JobStatus.DEAD_LETTER, 1),
            waiting: (JobStatus.QUEUED, 0),
            waiting_canceled: (JobStatus.CANCELED, 0),
        }
        row = repository.get_job(conn, waiting)
        assert (row.status, row.attempt, row.lease_token) == (JobStatus.QUEUED, 0, None)
        assert row.run_at <= datetime.now(UTC) and row.last_error_code is None
        assert _actions(conn, waiting) == ["submitted", "claimed", "returned_unstarted"]
        assert _actions(conn, started)[-1] == "lease_expired"
        assert _actions(conn, waiting_canceled)[-1] == "canceled"
        conn.commit()

        # Claimed again (once the placing step gave it a turn), it still has its one attempt;
        # once its start is recorded, a lost lease charges it like any attempt that began.
        assert repository.place_due(conn) == 1
        conn.commit()
        (again,) = repository.claim(conn, worker_id="next", limit=1, lease_seconds=0.0).jobs
        assert (again.id, again.attempt) == (waiting, 0)
        assert repository.record_prefetched(conn, [(again.id, again.lease_token)]) == {waiting}
        assert repository.record_start(conn, again.id, again.lease_token)
        conn.commit()
        assert {i: (o.status, o.attempt) for i, o in _reap(conn).items()} == {
            waiting: (JobStatus.DEAD_LETTER, 1)
        }


def test_records_need_the_lease(conn: Connection, registry: Registry, org_id: uuid.UUID) -> None:
    job_id = _submit(conn, registry, org_id, max_attempts=3)
    (job,) = repository.claim(conn, worker_id="w", limit=1, lease_seconds=30).jobs
    stranger = uuid.uuid4()
    assert repository.record_prefetched(conn, [(job_id, stranger)]) == set()
    assert not repository.record_start(conn, job_id, stranger)
    assert repository.get_job(conn, job_id).started_at is not None
    assert repository.record_prefetched(conn, [(job_id, job.lease_token)]) == {job_id}
    assert repository.get_job(conn, job_id).started_at is None
    assert repository.record_start(conn, job_id, job.lease_token)
    assert repository.get_job(conn, job_id).started_at is not None
