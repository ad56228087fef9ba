"""The turn clock across queues, in the ledger's own statements on real PostgreSQL: a newcomer
in one queue waits at most one job per other org of that queue, however far another queue's
claims have moved the clock."""

from __future__ import annotations

import uuid

from sqlalchemy import Connection, Engine

from heimdex.ledger import repository
from heimdex.ledger.repository import NewJob, Outcome
from heimdex.models import JobStatus


def _submit(conn: Connection, org: uuid.UUID, n: int, queue: str) -> list[uuid.UUID]:
    jobs = [NewJob(org, "noop", {}, None, queue=queue) for _ in range(n)]
    return [r.id for r in repository.insert_jobs(conn, jobs)]


def _claim(conn: Connection, limit: int, queue: str) -> list[repository.ClaimedJob]:
    claim = repository.claim(conn, worker_id="w", limit=limit, lease_seconds=60, queues=(queue,))
    return claim.jobs


def _done(conn: Connection, jobs: list[repository.ClaimedJob]) -> None:
    repository.write_outcomes(
        conn,
        [Outcome(j.id, j.lease_token, JobStatus.SUCCEEDED, j.attempt, {"action": "ok"})
         for j in jobs],
    )  # fmt: skip


def test_a_newcomer_waits_one_job_per_org_of_its_queue_whatever_another_queue_claimed(
    engine: Engine,
) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        gpu_orgs = [uuid.uuid4() for _ in range(5)]
        for org in gpu_orgs:
            _submit(conn, org, 50, "gpu")  # the gpu pool's backlog: 50 rounds of 5 orgs
        _submit(conn, uuid.uuid4(), 200, "default")  # one org alone in the default pool
        _done(conn, _claim(conn, 200, "default"))  # the fast pool runs its 200 jobs
        _done(conn, _claim(conn, 5, "gpu"))  # the slow pool, one round
        (job,) = _submit(conn, uuid.uuid4(), 1, "gpu")
        ahead = 0
        while (claimed := _claim(conn, 1, "gpu")) and claimed[0].id != job:
            ahead += 1
        assert claimed, "the newcomer's job was never claimed"
        assert ahead <= len(gpu_orgs)


def test_an_org_busy_in_one_queue_is_a_newcomer_in_another(engine: Engine) -> None:
    """An org's turns are counted per queue: its backlog in a fast pool does not push its first
    job in a slow pool behind that pool's work."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        busy = uuid.uuid4()
        gpu_orgs = [uuid.uuid4() for _ in range(5)]
        for org in gpu_orgs:
            _submit(conn, org, 20, "gpu")
        _submit(conn, busy, 500, "default")  # 500 turns ahead of the clock in `default`
        (job,) = _submit(conn, busy, 1, "gpu")
        ahead = 0
        while (claimed := _claim(conn, 1, "gpu")) and claimed[0].id != job:
            ahead += 1
        assert claimed, "the job was never claimed"
        assert ahead <= len(gpu_orgs)
