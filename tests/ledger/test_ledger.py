"""The ledger on real PostgreSQL: submission, the claim's order, outcomes, the retry rule, the
reaper, stages and cancel. Each function under test takes a connection and never commits."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection, Engine, text

from heimdex.ledger import repository, service
from heimdex.ledger.errors import (
    IdempotencyConflict,
    IllegalTransition,
    InvalidBatchItem,
    JobAlreadyFinished,
    JobNotFound,
    LedgerError,
)
from heimdex.ledger.registry import Registry, load_registry
from heimdex.ledger.repository.scopes import TURN_UNIT
from heimdex.ledger.states import can_transition, ensure_transition
from heimdex.models import TERMINAL_STATUSES, JobStatus

POLICY = service.RetryPolicy(base_seconds=10.0, max_seconds=60.0)
NOOP = service.JobSpec("noop", {})


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


@pytest.fixture
def conn(engine: Engine) -> Iterator[Connection]:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        yield conn


def _submit(conn: Connection, registry: Registry, org: uuid.UUID, **kw: object) -> uuid.UUID:
    spec = service.JobSpec(**{"type": "noop", "params": {}, **kw})  # type: ignore[arg-type]
    return service.submit_job(conn, registry, org_id=org, spec=spec).job.id


@contextlib.contextmanager
def _transaction(conn: Connection) -> Iterator[None]:
    """BEGIN ... COMMIT on the autocommit connection (ROLLBACK on error)."""
    conn.exec_driver_sql("BEGIN")
    try:
        yield
    except BaseException:
        conn.exec_driver_sql("ROLLBACK")
        raise
    conn.exec_driver_sql("COMMIT")


def _events(conn: Connection, job_id: uuid.UUID) -> list[tuple[str | None, str, str]]:
    return [
        (e.prev_status, e.next_status, (e.detail_json or {}).get("action"))
        for e in repository.list_events(conn, job_id)
    ]


def _claim(conn: Connection, limit: int = 10, lease: float = 30.0) -> list[repository.ClaimedJob]:
    return repository.claim(conn, worker_id="w1", limit=limit, lease_seconds=lease).jobs


def test_submit_without_key_always_creates(
    conn: Connection, registry: Registry, org_id: uuid.UUID
) -> None:
    a = service.submit_job(conn, registry, org_id=org_id, spec=NOOP)
    b = service.submit_job(conn, registry, org_id=org_id, spec=NOOP)
    assert a.created and b.created and a.job.id != b.job.id
    assert a.job.status is JobStatus.QUEUED
    assert a.job.run_at <= datetime.now(UTC) + timedelta(seconds=1)
    assert _events(conn, a.job.id) == [(None, "queued", "submitted")]


def test_submit_returns_the_row_as_the_typed_reads_see_it(
    conn: Connection, registry: Registry, org_id: uuid.UUID
) -> None:
    """The submit path reads its rows from the driver (`JobRecord`); they must carry the
    columns, values and types of the typed SQLAlchemy read of the same job, and a replay
    (`by_keys`) the same again."""
    assert repository.JobRecord._fields == tuple(c.name for c in repository.JOB.columns)
    spec = service.JobSpec(
        "noop", {}, priority=3, idempotency_key="rec", run_at=datetime(2030, 1, 1, tzinfo=UTC)
    )
    created = service.submit_job(conn, registry, org_id=org_id, spec=spec, requested_by="me")
    replay = service.submit_job(conn, registry, org_id=org_id, spec=spec, requested_by="me")
    read = repository.get_job(conn, created.job.id)
    for submitted in (created.job, replay.job):
        assert tuple(submitted) == tuple(read)
        assert [type(v) for v in submitted] == [type(v) for v in read]
    assert created.job.status is JobStatus.QUEUED and created.job.params == {}


def test_statements_on_the_driver_commit_with_the_callers_connection(
    engine: Engine, registry: Registry, org_id: uuid.UUID
) -> None:
    """The submit and the claim run on the driver under the caller's connection: a caller
    that lets SQLAlchemy begin the transaction and then calls `commit()` must commit them."""
    with engine.connect() as conn:
        job = service.submit_job(conn, registry, org_id=org_id, spec=NOOP).job
        conn.commit()
        claimed = repository.claim(conn, worker_id="w", limit=1, lease_seconds=30).jobs
        conn.commit()
    assert [c.id for c in claimed] == [job.id]
    with engine.connect() as other:
        status = other.execute(text("SELECT status FROM job WHERE id = :id"), {"id": job.id})
        assert status.scalar_one() == "running"


def test_idempotent_replay_conflict_and_other_org(
    conn: Connection, registry: Registry, org_id: uuid.UUID
) -> None:
    spec = service.JobSpec("noop", {}, idempotency_key="k1")
    first = service.submit_job(conn, registry, org_id=org_id, spec=spec)
    again = service.submit_job(conn, registry, org_id=org_id, spec=spec)
    assert first.created and not again.created and again.job.id == first.job.id
    with pytest.raises(IdempotencyConflict):
        service.submit_job(
            conn, registry, org_id=org_id,
            spec=service.JobSpec("noop", {}, priority=5, idempotency_key="k1"),
        )  # fmt: skip
    other = service.submit_job(conn, registry, org_id=uuid.uuid4(), spec=spec)
    assert other.created and other.job.id != first.job.id
    assert conn.execute(text("SELECT count(*) FROM job_event")).scalar() == 2


def test_batch_keeps_order_and_dedupes_keys(
    conn: Connection, registry: Registry, org_id: uuid.UUID
) -> None:
    specs = [
        service.JobSpec("noop", {}, priority=1),
        service.JobSpec("noop", {}, idempotency_key="a"),
        service.JobSpec("noop", {}, priority=3),
        service.JobSpec("noop", {}, idempotency_key="a"),
    ]
    out = service.submit_jobs(conn, registry, org_id=org_id, specs=specs)
    assert [s.created for s in out] == [True, True, True, False]
    assert [s.job.priority for s in out] == [1, 0, 3, 0]
    assert out[1].job.id == out[3].job.id
    assert conn.execute(text("SELECT count(*) FROM job")).scalar() == 3


def test_invalid_batch_item_refuses_the_whole_batch(
    engine: Engine, registry: Registry, org_id: uuid.UUID
) -> None:
    bad = [NOOP, service.JobSpec("mock_process", {"stage_seconds": -1})]
    with pytest.raises(InvalidBatchItem, match=r"jobs\[1\]"), engine.begin() as conn:
        service.submit_jobs(conn, registry, org_id=org_id, specs=bad)
    clash = [
        service.JobSpec("noop", {}, idempotency_key="x"),
        service.JobSpec("noop", {}, priority=1, idempotency_key="x"),
    ]
    with pytest.raises(LedgerError, match="twice in this batch"), engine.begin() as conn:
        service.submit_jobs(conn, registry, org_id=org_id, specs=clash)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM job")).scalar() == 0


def test_claim_takes_priority_first_then_round_robin_across_orgs(
    conn: Connection, registry: Registry
) -> None:
    busy, quiet, urgent = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    service.submit_jobs(conn, registry, org_id=busy, specs=[NOOP] * 30)
    late = _submit(conn, registry, quiet)
    vip = _submit(conn, registry, urgent, priority=5)
    batch = _claim(conn, limit=5)
    assert batch[0].id == vip
    assert late in [j.id for j in batch]
    assert [j.org_id for j in batch].count(busy) == 3
    assert all(j.status is JobStatus.RUNNING and j.lease_token for j in batch)
    assert _events(conn, late)[-1] == ("queued", "running", "claimed")


def test_claim_waits_for_run_at(conn: Connection, registry: Registry, org_id: uuid.UUID) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    _submit(conn, registry, org_id, run_at=later)
    assert _claim(conn) == []
    conn.execute(text("UPDATE job SET run_at = now() - interval '1 second'"))
    waiting = repository.claim(conn, worker_id="w1", limit=10, lease_seconds=30)
    assert waiting.jobs == [] and waiting.more_due  # due, and waiting for its turn
    assert repository.place_due(conn) == 1
    assert len(_claim(conn)) == 1


def test_concurrent_claims_never_share_a_job(
    engine: Engine, registry: Registry, org_id: uuid.UUID
) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        service.submit_jobs(conn, registry, org_id=org_id, specs=[NOOP] * 8)
    with engine.begin() as first:
        mine = _claim(first, limit=5)  # locked until this transaction ends
        with engine.begin() as second:
            theirs = _claim(second, limit=5)
    assert len(mine) == 5 and len(theirs) == 3
    assert not {j.id for j in mine} & {j.id for j in theirs}


def test_a_claim_locks_what_it_takes_and_passes_the_rows_others_hold(
    engine: Engine, registry: Registry
) -> None:
    orgs = [uuid.uuid4() for _ in range(20)]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for org in orgs:
            service.submit_jobs(conn, registry, org_id=org, specs=[NOOP] * 5)
    lockable = text("SELECT count(*) FROM (SELECT id FROM job FOR UPDATE SKIP LOCKED) AS free")
    with engine.begin() as first:
        claim = repository.claim(first, worker_id="a", limit=10, lease_seconds=30)
        assert len(claim.jobs) == 10 and not claim.more_due
        assert len({j.org_id for j in claim.jobs}) == 10  # one job per org: round-robin
        with engine.begin() as other:
            # 10 rows locked, not 10 per org with queued work (which would be all 100).
            assert other.execute(lockable).scalar() == 90
    # Three claimers in flight on one org: each passes the rows the ones before it hold and
    # takes the next (the third the last 5, behind 20 held ones).
    one = uuid.uuid4()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(
            text("UPDATE job SET status = 'canceled', finished_at = now() WHERE status = 'queued'")
        )
        service.submit_jobs(conn, registry, org_id=one, specs=[NOOP] * 25)
    with engine.begin() as first:
        mine = repository.claim(first, worker_id="a", limit=10, lease_seconds=30)
        with engine.begin() as second:
            theirs = repository.claim(second, worker_id="b", limit=10, lease_seconds=30)
            with engine.begin() as third:
                left = repository.claim(third, worker_id="c", limit=10, lease_seconds=30)
    assert [len(c.jobs) for c in (mine, theirs, left)] == [10, 10, 5]
    ids = [{j.id for j in c.jobs} for c in (mine, theirs, left)]
    assert len(ids[0] | ids[1] | ids[2]) == 25
    with engine.connect() as conn:
        assert repository.claim(conn, worker_id="d", limit=10, lease_seconds=30) == (
            repository.Claim([], more_due=False)
        )
        conn.rollback()


def test_jobs_coming_due_later_are_placed_then_not_before_the_queue(
    conn: Connection, registry: Registry
) -> None:
    """A scheduled (or retried) job gets its turn when it comes due: the clock has moved on
    meanwhile, so a backlog scheduled long ago takes turns with the others' work instead of
    running before all of it."""
    scheduled, busy, late = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    later = datetime.now(UTC) + timedelta(hours=1)
    service.submit_jobs(
        conn, registry, org_id=scheduled, specs=[dataclasses.replace(NOOP, run_at=later)] * 40
    )
    service.submit_jobs(conn, registry, org_id=busy, specs=[NOOP] * 30)
    assert len(_claim(conn, limit=20)) == 20  # the clock moves to the busy org's turn 19
    conn.execute(
        text("UPDATE job SET run_at = now() - interval '1 minute' WHERE org_id = :o"),
        {"o": scheduled},
    )
    assert repository.claim(conn, worker_id="w1", limit=0, lease_seconds=30).more_due
    assert repository.place_due(conn) == 40
    newcomer = _submit(conn, registry, late)
    batch = _claim(conn, limit=10)
    orgs = [j.org_id for j in batch]
    assert newcomer in [j.id for j in batch]
    assert orgs.count(scheduled) == 5 and orgs.count(busy) == 4, orgs  # turn by turn
    # What the claim placed and did not take keeps its turn: none is left unplaced.
    unplaced = text("SELECT count(*) FROM job WHERE status = 'queued' AND turn IS NULL")
    assert conn.execute(unplaced).scalar() == 0
    rest = _claim(conn, limit=100)
    assert [j.org_id for j in rest].count(scheduled) == 35


def _come_due_unplaced(conn: Connection, orgs: list[uuid.UUID], n: int) -> None:
    """`n` queued jobs over `orgs` that came due without a turn (retries, requeues, scheduled
    jobs, rows from before turns), the oldest first in `g` order."""
    conn.execute(
        text("""
INSERT INTO job (org_id, type, attempt, run_at)
SELECT (CAST(:orgs AS uuid[]))[1 + g % cardinality(CAST(:orgs AS uuid[]))], 'noop', 1,
       now() - make_interval(secs => :n - g)
  FROM generate_series(1, :n) AS g"""),
        {"orgs": orgs, "n": n},
    )


def test_a_claim_locks_only_what_it_takes_while_jobs_wait_to_be_placed(
    engine: Engine, registry: Registry
) -> None:
    """Placing is a step of its own (`place_due`): a claim neither places nor locks the jobs
    that came due unplaced, however many; it says they are there (`more_due`)."""
    orgs = [uuid.uuid4() for _ in range(50)]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        _come_due_unplaced(conn, orgs, 500)
        service.submit_jobs(conn, registry, org_id=orgs[0], specs=[NOOP] * 20)
    lockable = text("SELECT count(*) FROM (SELECT id FROM job FOR UPDATE SKIP LOCKED) AS free")
    unplaced = text("SELECT count(*) FROM job WHERE status = 'queued' AND turn IS NULL")
    with engine.begin() as first:
        claim = repository.claim(first, worker_id="a", limit=10, lease_seconds=30)
        with engine.begin() as other:
            assert other.execute(lockable).scalar() == 510  # 20 + 500 jobs, 10 of them taken
            assert other.execute(unplaced).scalar() == 500
    assert len(claim.jobs) == 10 and claim.more_due


def test_placing_takes_a_small_batch_oldest_first_one_placer_at_a_time(
    engine: Engine, registry: Registry
) -> None:
    """`place_due` gives turns to at most PLACE_BATCH due jobs, oldest due first, in a
    transaction of its own; a second placer meanwhile places nothing and says so (None), and a
    claim meanwhile takes the placed queue without waiting for either."""
    orgs = [uuid.uuid4() for _ in range(7)]
    n = 2 * repository.PLACE_BATCH + 5
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        _come_due_unplaced(conn, orgs, n)
        ready = service.submit_jobs(conn, registry, org_id=uuid.uuid4(), specs=[NOOP] * 3)
        oldest = [
            r.id
            for r in conn.execute(
                text("SELECT id FROM job WHERE turn IS NULL ORDER BY run_at LIMIT :n"),
                {"n": repository.PLACE_BATCH},
            )
        ]
    placed_turns = text(
        "SELECT id, org_id, turn FROM job WHERE status = 'queued' AND turn IS NOT NULL"
        " AND id <> ALL(CAST(:ready AS uuid[])) ORDER BY org_id, run_at"
    )
    with engine.begin() as placer:
        assert repository.place_due(placer) == repository.PLACE_BATCH
        with engine.begin() as second:
            assert repository.place_due(second) is None
        with engine.begin() as claimer:
            claimer.execute(text("SET LOCAL lock_timeout = '5s'"))  # fail rather than hang
            taken = repository.claim(claimer, worker_id="c", limit=10, lease_seconds=30)
            assert {j.id for j in taken.jobs} == {r.job.id for r in ready} and taken.more_due
            claimer.rollback()
        rows = placer.execute(placed_turns, {"ready": [r.job.id for r in ready]}).all()
    assert {r.id for r in rows} == set(oldest)
    for org in orgs:  # each org's jobs take consecutive turns, oldest due first
        turns = [r.turn for r in rows if r.org_id == org]
        assert turns == [turns[0] + i * TURN_UNIT for i in range(len(turns))], turns
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        assert repository.place_due(conn) == repository.PLACE_BATCH
        assert repository.place_due(conn) == 5
        assert repository.place_due(conn) == 0
        assert not repository.claim(conn, worker_id="w", limit=0, lease_seconds=30).more_due


def test_outcome_needs_the_lease_and_keeps_long_errors_in_the_event(
    conn: Connection, registry: Registry, org_id: uuid.UUID
) -> None:
    _submit(conn, registry, org_id, max_attempts=1)
    (job,) = _claim(conn)
    stale = dataclasses.replace(service.succeeded(job, {}), lease_token=uuid.uuid4())
    assert repository.write_outcomes(conn, [stale]) == {}
    message = "x" * 5000
    failed = service.fail_attempts(
        conn,
        [service.Failure(job.id, job.lease_token, "C" * 80, message, retryable=True)],
        policy=POLICY,
    )
    assert [o.status for o in failed] == [JobStatus.DEAD_LETTER]
    row = repository.get_job(conn, job.id)
    assert (row.status, row.attempt) == (JobStatus.DEAD_LETTER, 1)
    assert row.last_error_code == "C" * 64 and len(row.last_error_message) == 2048
    assert row.finished_at is not None and row.lease_token is None
    last = repository.list_events(conn, job.id)[-1]
    assert last.detail_json["error"]["message"] == message


def test_retry_rule_backoff_permanent_failure_and_cancel_wins(
    conn: Connection, registry: Registry, org_id: uuid.UUID
) -> None:
    ids = [_submit(conn, registry, org_id, max_attempts=3) for _ in range(3)]
    jobs = {j.id: j for j in _claim(conn)}
    retried, permanent, canceled = (jobs[i] for i in ids)
    conn.execute(text("UPDATE job SET cancel_requested = true WHERE id = :id"), {"id": canceled.id})
    failures = [
        service.Failure(retried.id, retried.lease_token, "E", "boom", retryable=True),
        service.Failure(permanent.id, permanent.lease_token, "P", "bad", retryable=False),
        service.Failure(canceled.id, canceled.lease_token, "E", "boom", retryable=True),
    ]
    with _transaction(conn):
        service.fail_attempts(conn, failures, policy=POLICY)
    states = {i: repository.get_job(conn, i) for i in ids}
    assert states[retried.id].status is JobStatus.QUEUED
    wait = (states[retried.id].run_at - datetime.now(UTC)).total_seconds()
    assert 5 < wait <= 10  # exp backoff: base * 2**0
    assert states[permanent.id].status is JobStatus.FAILED
    assert states[canceled.id].status is JobStatus.CANCELED
    assert all(s.attempt == 1 for s in states.values())
    assert _claim(conn) == []  # the retry is not due yet


def test_reaper_requeues_expired_leases_and_voids_the_late_outcome(
    conn: Connection, registry: Registry, org_id: uuid.UUID
) -> None:
    job_id = _submit(conn, registry, org_id, max_attempts=2)
    policy = service.RetryPolicy(base_seconds=0.0, max_seconds=0.0)
    for expected in ((JobStatus.QUEUED, 1), (JobStatus.DEAD_LETTER, 2)):
        repository.place_due(conn)  # the requeued job takes a turn again
        (claimed,) = _claim(conn, lease=0.0)
        with _transaction(conn):
            reaped = service.reap_expired_leases(conn, policy=policy, stale_after_seconds=60)
        assert [(o.job_id, o.status, o.attempt) for o in reaped] == [(job_id, *expected)]
        assert repository.write_outcomes(conn, [service.succeeded(claimed, {})]) == {}
    actions = [a for _, _, a in _events(conn, job_id)]
    assert actions == ["submitted", "claimed", "lease_expired", "claimed", "lease_expired"]
    assert repository.get_job(conn, job_id).last_error_code == "LEASE_EXPIRED"


def test_stage_heartbeat_and_cancel_of_a_running_job(
    conn: Connection, registry: Registry, org_id: uuid.UUID
) -> None:
    job_id = _submit(conn, registry, org_id)
    (job,) = _claim(conn)
    token = job.lease_token
    assert repository.record_stage(conn, job_id, token, stage="probe", progress=150) is False
    assert repository.renew_leases(conn, [token, uuid.uuid4()], lease_seconds=30) == {token}
    with _transaction(conn):
        flagged = service.cancel_job(conn, org_id=org_id, job_id=job_id, requested_by="op")
    assert flagged.cancel_requested and flagged.status is JobStatus.RUNNING
    assert repository.record_stage(conn, job_id, token, stage="next", progress=50) is True
    assert repository.record_stage(conn, job_id, uuid.uuid4(), stage="x", progress=1) is None
    repository.write_outcomes(conn, [service.canceled(job, stage="probe")])
    row = repository.get_job(conn, job_id)
    assert (row.status, row.stage, row.progress) == (JobStatus.CANCELED, "probe", 100)
    assert [a for _, _, a in _events(conn, job_id)] == [
        "submitted", "claimed", "progress", "cancel_requested", "canceled",
    ]  # fmt: skip
    with pytest.raises(JobAlreadyFinished), _transaction(conn):
        service.cancel_job(conn, org_id=org_id, job_id=job_id)
    with pytest.raises(JobNotFound), _transaction(conn):
        service.cancel_job(conn, org_id=uuid.uuid4(), job_id=job_id)


def test_queued_cancel_and_the_callers_transaction(
    engine: Engine, registry: Registry, org_id: uuid.UUID
) -> None:
    with engine.begin() as conn:
        job_id = _submit(conn, registry, org_id)
    with engine.connect() as conn:
        service.cancel_job(conn, org_id=org_id, job_id=job_id)
        conn.rollback()  # the caller owns the transaction: nothing was committed
        assert repository.get_job(conn, job_id).status is JobStatus.QUEUED
        canceled = service.cancel_job(conn, org_id=org_id, job_id=job_id)
        conn.commit()
    assert canceled.status is JobStatus.CANCELED and canceled.finished_at is not None


@pytest.mark.parametrize("terminal", sorted(TERMINAL_STATUSES))
def test_terminal_states_have_no_way_out(terminal: JobStatus) -> None:
    job_id = uuid.uuid4()
    for target in JobStatus:
        assert not can_transition(terminal, target)
        with pytest.raises(IllegalTransition):
            ensure_transition(job_id, terminal, target)
    with pytest.raises(IllegalTransition, match="queued -> succeeded"):
        ensure_transition(job_id, JobStatus.QUEUED, JobStatus.SUCCEEDED)


def test_a_submit_places_due_jobs_after_the_orgs_last_turn_and_not_before_the_clock(
    conn: Connection, registry: Registry
) -> None:
    busy, other = uuid.uuid4(), uuid.uuid4()
    turns = text("SELECT turn FROM job WHERE id = ANY(CAST(:ids AS uuid[])) ORDER BY turn")
    batch = service.submit_jobs(conn, registry, org_id=busy, specs=[NOOP] * 20)
    u = TURN_UNIT  # a turn per job of an org of weight 1
    assert conn.execute(turns, {"ids": [r.job.id for r in batch]}).scalars().all() == [
        i * u for i in range(20)
    ]
    assert len(_claim(conn, limit=12)) == 12  # turns 0-11: the clock is at 11
    one, two = _submit(conn, registry, other), _submit(conn, registry, other)  # one by one
    later = _submit(conn, registry, other, run_at=datetime.now(UTC) + timedelta(hours=1))
    assert conn.execute(turns, {"ids": [one, two]}).scalars().all() == [11 * u, 12 * u]
    assert conn.execute(turns, {"ids": [later]}).scalars().all() == [None]  # placed when due
    more = service.submit_jobs(conn, registry, org_id=busy, specs=[NOOP] * 2)
    assert conn.execute(turns, {"ids": [r.job.id for r in more]}).scalars().all() == [
        20 * u,
        21 * u,
    ]
