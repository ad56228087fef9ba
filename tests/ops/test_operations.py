"""Operator operations on real PostgreSQL: retry, cancel, requeue, by id and in bulk, with the
actor and reason in every event; the reads behind the console."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from heimdex.ledger import operations as ops
from heimdex.ledger import repository
from heimdex.ledger.errors import (
    IllegalTransition,
    JobAlreadyFinished,
    LedgerError,
    NotEligible,
)
from heimdex.ledger.fingerprint import error_fingerprint
from heimdex.ledger.repository import JobFilter
from heimdex.ledger.states import OPERATOR_TRANSITIONS, ensure_operator_transition
from heimdex.models import JobStatus
from tests.ops import seed

ME = ops.Operator("alice", "upstream fixed")


def _events(engine: Engine, job_id: uuid.UUID) -> list[tuple[str | None, str, dict[str, object]]]:
    with engine.connect() as conn:
        return [
            (e.prev_status, e.next_status, e.detail_json)
            for e in repository.list_events(conn, job_id)
        ]


def _status(engine: Engine, job_id: uuid.UUID) -> JobStatus:
    with engine.connect() as conn:
        return repository.get_job(conn, job_id).status  # type: ignore[no-any-return]


def test_retry_a_dead_letter_gives_a_fresh_budget_and_records_who_and_why(
    engine: Engine, org_id: uuid.UUID
) -> None:
    (job_id,) = seed.failed(engine, org_id)
    with engine.begin() as conn:
        job = ops.retry(conn, job_id, ME)
    assert job.status is JobStatus.QUEUED
    assert (job.attempt, job.finished_at) == (0, None)
    assert job.run_at <= datetime.now(UTC)
    assert job.last_error_code == "UPSTREAM_TIMEOUT"  # the last error stays readable
    prev, nxt, detail = _events(engine, job_id)[-1]
    assert (prev, nxt) == ("dead_letter", "queued")
    assert detail == {
        "action": "retried", "actor": "alice", "reason": "upstream fixed", "attempts_before": 1,
    }  # fmt: skip
    with engine.begin() as conn:
        assert repository.place_due(conn) == 1  # due now: it takes a turn in the queue
        (claimed,) = repository.claim(conn, worker_id="w", limit=5, lease_seconds=30).jobs
    assert claimed.id == job_id


@pytest.mark.parametrize("retryable", [False, True])
def test_retry_of_failed_and_canceled_jobs(
    engine: Engine, org_id: uuid.UUID, retryable: bool
) -> None:
    (failed,) = seed.failed(engine, org_id, retryable=retryable)
    (canceled,) = seed.queued(engine, org_id)
    with engine.begin() as conn:
        ops.cancel(conn, canceled, ME)
        assert ops.retry(conn, failed, ME).status is JobStatus.QUEUED
        assert ops.retry(conn, canceled, ME).status is JobStatus.QUEUED
    assert _events(engine, failed)[-1][0] == ("dead_letter" if retryable else "failed")
    assert _events(engine, canceled)[-1][:2] == ("canceled", "queued")


def test_illegal_operator_actions_are_refused_and_change_nothing(
    engine: Engine, org_id: uuid.UUID
) -> None:
    seed.queued(engine, org_id, 2)
    with engine.begin() as conn:
        first, second = repository.claim(conn, worker_id="w", limit=2, lease_seconds=30).jobs
        repository.write_outcomes(conn, [repository.Outcome(
            first.id, first.lease_token, JobStatus.SUCCEEDED, 0, {"action": "succeeded"},
            result={},
        )])  # fmt: skip
    succeeded, running = first.id, second.id
    before = {j: _events(engine, j) for j in (running, succeeded)}
    with engine.begin() as conn:
        with pytest.raises(IllegalTransition, match="succeeded -> queued"):
            ops.retry(conn, succeeded, ME)
        with pytest.raises(NotEligible, match="running; retry applies to dead_letter"):
            ops.retry(conn, running, ME)
        with pytest.raises(JobAlreadyFinished):
            ops.cancel(conn, succeeded, ME)
        with pytest.raises(NotEligible, match="requeue applies to queued"):
            ops.requeue_now(conn, running, ME)
        with pytest.raises(LedgerError, match="needs a reason"):
            ops.retry(conn, succeeded, ops.Operator("alice", "  "))
    assert {j: _events(engine, j) for j in (running, succeeded)} == before
    with pytest.raises(IllegalTransition):
        ensure_operator_transition(succeeded, JobStatus.SUCCEEDED, JobStatus.QUEUED)
    assert JobStatus.SUCCEEDED not in OPERATOR_TRANSITIONS


def test_cancel_queued_now_and_running_at_its_next_stage(engine: Engine, org_id: uuid.UUID) -> None:
    a, b = seed.queued(engine, org_id, 2)
    with engine.begin() as conn:
        repository.claim(conn, worker_id="w", limit=1, lease_seconds=30)
    running = a if _status(engine, a) is JobStatus.RUNNING else b
    queued = b if running == a else a
    with engine.begin() as conn:
        assert ops.cancel(conn, queued, ME).status is JobStatus.CANCELED
        job = ops.cancel(conn, running, ME)
        assert (job.status, job.cancel_requested) == (JobStatus.RUNNING, True)
        ops.cancel(conn, running, ME)  # asked twice: no second event
    assert _events(engine, queued)[-1][2]["actor"] == "alice"  # type: ignore[index]
    assert [e[2]["action"] for e in _events(engine, running)] == [  # type: ignore[index]
        "submitted", "claimed", "cancel_requested",
    ]  # fmt: skip


def test_requeue_now_makes_a_scheduled_job_due(engine: Engine, org_id: uuid.UUID) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    (job_id,) = seed.queued(engine, org_id, run_at=later)
    with engine.begin() as conn:
        job = ops.requeue_now(conn, job_id, ops.Operator("bob"))
        assert job.run_at <= datetime.now(UTC)
        ops.requeue_now(conn, job_id, ops.Operator("bob"))  # already due: nothing written
    assert [e[2]["action"] for e in _events(engine, job_id)] == [  # type: ignore[index]
        "submitted", "requeued",
    ]  # fmt: skip


def test_bulk_by_filter_previews_then_runs_in_batches(engine: Engine) -> None:
    org, other = uuid.uuid4(), uuid.uuid4()
    timeouts = seed.failed(engine, org, 7)
    seed.failed(engine, org, 2, code="BAD_INPUT", message="row {n} is empty")
    seed.failed(engine, other, 3)
    group = JobFilter(org_id=org, error_code="UPSTREAM_TIMEOUT")
    with engine.connect() as conn:
        assert ops.preview(conn, ops.Action.RETRY, group) == 7
    dry = ops.bulk(engine, ops.Action.RETRY, group, ME, dry_run=True)
    assert (dry.dry_run, dry.jobs, dry.batches) == (True, 7, 0)
    assert {_status(engine, j) for j in timeouts} == {JobStatus.DEAD_LETTER}
    sizes: list[int] = []
    done = ops.bulk(engine, ops.Action.RETRY, group, ME, batch_size=3, on_batch=sizes.append)
    assert (done.jobs, done.batches, sizes) == (7, 3, [3, 3, 1])
    assert sorted(done.job_ids) == sorted(timeouts)
    with engine.connect() as conn:
        left = conn.execute(
            text("SELECT org_id = :org AS mine, last_error_code, status::text, count(*)"
                 " FROM job GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"), {"org": org}
        ).all()  # fmt: skip
    assert [tuple(r) for r in left] == [
        (False, "UPSTREAM_TIMEOUT", "dead_letter", 3),
        (True, "BAD_INPUT", "dead_letter", 2),
        (True, "UPSTREAM_TIMEOUT", "queued", 7),
    ]
    assert ops.bulk(engine, ops.Action.RETRY, group, ME).jobs == 0


def test_bulk_filters_by_fingerprint_type_state_ids_and_created_range(engine: Engine) -> None:
    org = uuid.uuid4()
    same = seed.failed(engine, org, 3)  # differ only by numbers and ids: one fingerprint
    odd = seed.failed(engine, org, 1, message="refused by the upstream")
    with engine.connect() as conn:
        groups = ops.failures(conn)
    assert [(g.error_code, g.jobs) for g in groups] == [
        ("UPSTREAM_TIMEOUT", 3), ("UPSTREAM_TIMEOUT", 1),
    ]  # fmt: skip
    assert groups[0].fingerprint == error_fingerprint(
        groups[0].error_code, groups[0].sample_message
    )
    assert groups[0].sample_job_id in same and groups[1].sample_job_id in odd
    by_fp = JobFilter(error_fingerprint=groups[1].fingerprint)
    assert ops.bulk(engine, ops.Action.RETRY, by_fp, ME, dry_run=True).jobs == 1
    now = datetime.now(UTC)
    assert ops.bulk(
        engine, ops.Action.RETRY,
        JobFilter(type="noop", statuses=(JobStatus.DEAD_LETTER,), created_before=now,
                  created_after=now - timedelta(minutes=5), ids=tuple(same[:2])),
        ME, dry_run=True,
    ).jobs == 2  # fmt: skip
    assert ops.bulk(engine, ops.Action.RETRY, JobFilter(created_after=now), ME).jobs == 0


def test_bulk_refuses_an_empty_filter_and_states_the_action_does_not_apply_to(
    engine: Engine,
) -> None:
    with pytest.raises(LedgerError, match="needs job ids or at least one filter"):
        ops.bulk(engine, ops.Action.CANCEL, JobFilter(), ME)
    with pytest.raises(LedgerError, match="empty list of job ids"):
        ops.bulk(engine, ops.Action.CANCEL, JobFilter(ids=()), ME)
    with pytest.raises(LedgerError, match="retry applies to dead_letter, failed, canceled"):
        ops.bulk(engine, ops.Action.RETRY, JobFilter(statuses=(JobStatus.SUCCEEDED,)), ME)
    with pytest.raises(LedgerError, match="batch size"):
        ops.bulk(engine, ops.Action.CANCEL, JobFilter(type="noop"), ME, batch_size=0)


def test_bulk_cancel_and_requeue_by_org(engine: Engine) -> None:
    org, other = uuid.uuid4(), uuid.uuid4()
    later = datetime.now(UTC) + timedelta(hours=1)
    mine = seed.queued(engine, org, 4, run_at=later)
    theirs = seed.queued(engine, other, 2, run_at=later)
    assert ops.bulk(engine, ops.Action.REQUEUE, JobFilter(org_id=org), ME).jobs == 4
    assert ops.bulk(engine, ops.Action.REQUEUE, JobFilter(org_id=org), ME).jobs == 0
    assert ops.bulk(engine, ops.Action.CANCEL, JobFilter(ids=(mine[0], theirs[0])), ME).jobs == 2
    assert [_status(engine, j) for j in (*mine, *theirs)] == [
        JobStatus.CANCELED, *[JobStatus.QUEUED] * 3, JobStatus.CANCELED, JobStatus.QUEUED,
    ]  # fmt: skip


def test_a_batch_holds_its_locks_only_for_its_own_transaction(engine: Engine) -> None:
    """While a bulk retry runs, a claim between two batches takes what is already requeued:
    each batch commits before the next starts, so nothing waits for the whole bulk."""
    org = uuid.uuid4()
    seed.failed(engine, org, 6)
    claimed_between: list[int] = []

    def claim_now(_: int) -> None:
        # Another connection: a long transaction over the whole bulk would make it wait.
        with engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
            repository.place_due(conn)
            rows = repository.claim(conn, worker_id="w", limit=100, lease_seconds=30).jobs
        claimed_between.append(len(rows))

    ops.bulk(engine, ops.Action.RETRY, JobFilter(org_id=org), ME, batch_size=2,
             on_batch=claim_now)  # fmt: skip
    assert claimed_between == [2, 2, 2]


def test_a_concurrent_change_is_not_overwritten(engine: Engine, org_id: uuid.UUID) -> None:
    """A job the bulk has selected but another transaction changes first is checked again
    once its lock is free, and skipped when no longer eligible."""
    ids = seed.queued(engine, org_id, 3)
    locker = engine.connect()
    locker.exec_driver_sql("BEGIN")
    repository.get_job(locker, ids[1], lock=True)
    result: list[ops.BulkResult] = []
    worker = threading.Thread(
        target=lambda: result.append(
            ops.bulk(engine, ops.Action.CANCEL, JobFilter(org_id=org_id), ME)
        )
    )
    worker.start()
    repository.cancel_queued(locker, ids[1], {"action": "canceled", "by": "someone else"})
    locker.exec_driver_sql("COMMIT")
    locker.close()
    worker.join(timeout=30)
    assert [r.jobs for r in result] == [2]
    by = [e[2].get("by") for e in _events(engine, ids[1]) if e[1] == "canceled"]  # type: ignore[union-attr]
    assert by == ["someone else"]


def test_stats_counts_oldest_due_and_throughput(engine: Engine) -> None:
    org, other = uuid.uuid4(), uuid.uuid4()
    seed.failed(engine, org, 2)
    first = seed.queued(engine, other, 3)
    with engine.begin() as conn:
        (job,) = repository.claim(conn, worker_id="w", limit=1, lease_seconds=30).jobs
        repository.write_outcomes(conn, [repository.Outcome(
            job.id, job.lease_token, JobStatus.SUCCEEDED, 0, {"action": "succeeded"}, result={}
        )])  # fmt: skip
    with engine.connect() as conn:
        everything = ops.stats(conn, minutes=10)
        mine = ops.stats(conn, org_id=org, minutes=10)
    assert everything.by_status == {
        "queued": 2, "running": 0, "succeeded": 1, "failed": 0, "canceled": 0, "dead_letter": 2,
    }  # fmt: skip
    assert everything.by_type == {"noop": {"queued": 2, "succeeded": 1, "dead_letter": 2}}
    assert everything.by_org == {
        org: {"dead_letter": 2}, other: {"queued": 2, "succeeded": 1},
    }  # fmt: skip
    assert everything.oldest_due is not None and everything.oldest_due.id in first
    assert len(everything.throughput) == 10
    assert sum(m.succeeded for m in everything.throughput) == 1
    assert sum(m.failed for m in everything.throughput) == 2
    assert mine.by_status["queued"] == 0 and mine.oldest_due is None
    assert sum(m.failed for m in mine.throughput) == 2
    assert sum(m.succeeded for m in mine.throughput) == 0
