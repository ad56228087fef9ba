"""Retention on a real ledger: what goes, what stays, the archive hook and the one-pruner lock."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from sqlalchemy import Connection, Engine, Row, text

from heimdex.errors import HeimdexError
from heimdex.ledger import repository, retention
from heimdex.metrics import RetentionMetrics
from heimdex.models import JobStatus
from heimdex.settings import Ages, RetentionPolicy, Settings, parse_age

DAY = timedelta(days=1)
POLICY = RetentionPolicy(Ages(succeeded=DAY, failed=7 * DAY))


def _job(
    conn: Connection,
    org: uuid.UUID,
    status: JobStatus,
    age_days: float,
    *,
    events: int = 3,
) -> uuid.UUID:
    """A job in `status`, finished (or, unfinished, created and updated) `age_days` ago."""
    finished = status not in (JobStatus.QUEUED, JobStatus.RUNNING)
    job_id: uuid.UUID = conn.execute(
        text(
            "INSERT INTO job (org_id, type, status, created_at, updated_at, run_at, finished_at)"
            " SELECT :org, 'noop', CAST(:status AS job_status), t, t, t,"
            "        CASE WHEN :finished THEN t END"
            "   FROM (SELECT now() - make_interval(secs => :age) AS t) AS s RETURNING id"
        ),
        {"org": org, "status": status.value, "age": age_days * 86400, "finished": finished},
    ).scalar_one()
    conn.execute(
        text(
            "INSERT INTO job_event (job_id, ts, prev_status, next_status)"
            " SELECT :id, now() - make_interval(secs => :age), 'queued', 'running'"
            "   FROM generate_series(1, :n)"
        ),
        {"id": job_id, "age": age_days * 86400, "n": events},
    )
    return job_id


def _ids(engine: Engine) -> set[uuid.UUID]:
    with engine.connect() as conn:
        return set(conn.execute(text("SELECT id FROM job")).scalars())


def _orphan_events(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM job_event e"
                    " WHERE NOT EXISTS (SELECT 1 FROM job j WHERE j.id = e.job_id)"
                )
            ).scalar_one()
        )


def _event_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM job_event")).scalar_one())


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "events-first"])
def test_old_finished_jobs_go_with_their_events_and_the_rest_stays(
    engine: Engine, cascade: bool
) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        old = {
            _job(conn, org, JobStatus.SUCCEEDED, 2),
            _job(conn, org, JobStatus.CANCELED, 3),
            _job(conn, org, JobStatus.FAILED, 8),
            _job(conn, org, JobStatus.DEAD_LETTER, 30),
        }
        kept = {
            _job(conn, org, JobStatus.SUCCEEDED, 0.5),
            _job(conn, org, JobStatus.FAILED, 2),  # failed jobs are kept for 7 days
            _job(conn, org, JobStatus.DEAD_LETTER, 6),
            # Unfinished jobs are never touched, however old.
            _job(conn, org, JobStatus.QUEUED, 400),
            _job(conn, org, JobStatus.RUNNING, 400),
        }
    # Batches of 1 walk every target through several transactions.
    result = retention.prune(engine, POLICY, batch_size=1, cascade=cascade)
    assert result.complete and not result.skipped
    assert (result.jobs, result.events) == (4, 12)
    assert result.batches == 4
    assert _ids(engine) == kept
    assert not old & _ids(engine)
    assert _event_count(engine) == 15
    assert _orphan_events(engine) == 0
    assert retention.prune(engine, POLICY).jobs == 0


def test_dry_run_counts_and_deletes_nothing(engine: Engine) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        for _ in range(3):
            _job(conn, org, JobStatus.SUCCEEDED, 2, events=5)
        _job(conn, org, JobStatus.FAILED, 10, events=2)
        _job(conn, org, JobStatus.FAILED, 1)
    with engine.connect() as conn:
        result = retention.dry_run(conn, POLICY)
    assert result.by_target["succeeded older than 1d"].jobs == 3
    assert result.by_target["succeeded older than 1d"].events == 15
    assert result.by_target["failed older than 1w"].jobs == 1
    assert (result.jobs, result.events) == (4, 17)
    assert len(_ids(engine)) == 5


def test_an_org_override_keeps_or_drops_its_own_jobs(engine: Engine) -> None:
    keeper, hasty, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    policy = RetentionPolicy(
        Ages(succeeded=DAY, failed=7 * DAY),
        {keeper: Ages(succeeded=90 * DAY, failed=None), hasty: Ages(timedelta(hours=1), DAY)},
    )
    with engine.begin() as conn:
        kept = {
            _job(conn, keeper, JobStatus.SUCCEEDED, 30),
            _job(conn, keeper, JobStatus.DEAD_LETTER, 365),  # None: kept forever
            _job(conn, other, JobStatus.SUCCEEDED, 0.5),
        }
        gone = {
            _job(conn, keeper, JobStatus.SUCCEEDED, 100),
            _job(conn, hasty, JobStatus.SUCCEEDED, 0.5),
            _job(conn, hasty, JobStatus.FAILED, 2),
            _job(conn, other, JobStatus.SUCCEEDED, 2),
        }
    result = retention.prune(engine, policy)
    assert result.jobs == len(gone)
    assert _ids(engine) == kept


def test_the_archive_sees_the_rows_before_they_go(engine: Engine) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        old = {_job(conn, org, JobStatus.SUCCEEDED, 2, events=2) for _ in range(3)}
        _job(conn, org, JobStatus.SUCCEEDED, 0)
    seen: list[tuple[set[uuid.UUID], int, int]] = []

    def archive(conn: Connection, jobs: Sequence[Row[Any]], events: Sequence[Row[Any]]) -> None:
        ids = {j.id for j in jobs}
        # Same transaction, before the delete: the rows are still there.
        still = conn.execute(
            text("SELECT count(*) FROM job WHERE id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": list(ids)},
        ).scalar_one()
        seen.append((ids, len(events), still))

    result = retention.prune(engine, POLICY, batch_size=2, archive=archive)
    assert result.jobs == 3
    assert set().union(*(ids for ids, _, _ in seen)) == old
    assert sum(n for _, n, _ in seen) == 6
    assert all(still == len(ids) for ids, _, still in seen)


def test_a_failing_archive_deletes_nothing(engine: Engine) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        for _ in range(3):
            _job(conn, org, JobStatus.SUCCEEDED, 2)
    before = _ids(engine)

    def archive(conn: Connection, jobs: Sequence[Row[Any]], events: Sequence[Row[Any]]) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        retention.prune(engine, POLICY, archive=archive)
    assert _ids(engine) == before
    assert _event_count(engine) == 9
    # The lock was released with the failure: the next pass runs.
    assert retention.prune(engine, POLICY).jobs == 3


def test_the_jsonl_archive_holds_each_job_with_its_events(engine: Engine, tmp_path: Path) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        job_id = _job(conn, org, JobStatus.FAILED, 10, events=4)
    archive = retention.JsonlArchive(tmp_path / "pruned.jsonl")
    try:
        assert retention.prune(engine, POLICY, archive=archive).jobs == 1
    finally:
        archive.close()
    (line,) = (tmp_path / "pruned.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["id"] == str(job_id)
    assert record["status"] == "failed"
    assert len(record["events"]) == 4


def test_one_pruner_at_a_time(engine: Engine) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        _job(conn, org, JobStatus.SUCCEEDED, 2)
    holder = engine.connect()
    try:
        assert holder.execute(
            text("SELECT pg_try_advisory_lock(:k)"), {"k": retention.ADVISORY_LOCK_KEY}
        ).scalar_one()
        holder.commit()
        # A second pruner (another worker's keeper, inside the first one's pass) does nothing.
        seen: list[retention.PruneResult] = []

        def archive(conn: Connection, jobs: Sequence[Row[Any]], events: Sequence[Row[Any]]) -> None:
            seen.append(retention.prune(engine, POLICY))

        result = retention.prune(engine, POLICY)
        assert result.skipped and result.jobs == 0
        assert len(_ids(engine)) == 1
        holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": retention.ADVISORY_LOCK_KEY})
        holder.commit()
        assert retention.prune(engine, POLICY, archive=archive).jobs == 1
        assert [r.skipped for r in seen] == [True]
    finally:
        holder.close()


def test_a_row_someone_holds_is_left_for_the_next_pass(engine: Engine) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        held = _job(conn, org, JobStatus.SUCCEEDED, 2)
        free = _job(conn, org, JobStatus.SUCCEEDED, 3)
    with engine.connect() as other:
        other.execute(text("SELECT 1 FROM job WHERE id = :id FOR UPDATE"), {"id": held})
        assert retention.prune(engine, POLICY).jobs == 1
        other.rollback()
    assert _ids(engine) == {held}
    assert free not in _ids(engine)
    assert retention.prune(engine, POLICY).jobs == 1


def test_metrics_count_what_went(engine: Engine) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        _job(conn, org, JobStatus.SUCCEEDED, 2, events=2)
        _job(conn, org, JobStatus.DEAD_LETTER, 9, events=1)
    registry = CollectorRegistry()
    retention.prune(engine, POLICY, observer=RetentionMetrics(registry))
    value = registry.get_sample_value
    assert value("heimdex_retention_deleted_jobs_total", {"status": "succeeded"}) == 1
    assert value("heimdex_retention_deleted_jobs_total", {"status": "dead_letter"}) == 1
    assert value("heimdex_retention_deleted_events_total") == 3
    assert value("heimdex_retention_passes_total", {"outcome": "done"}) == 1


def test_policy_parsing() -> None:
    org = uuid.uuid4()
    policy = RetentionPolicy.parse("24h", "off", f"{org}=90d/1w")
    assert policy.default == Ages(DAY, None)
    assert policy.orgs == {org: Ages(90 * DAY, 7 * DAY)}
    assert RetentionPolicy.parse("1d", "1d", f" {org}=2d ").orgs[org] == Ages(2 * DAY, 2 * DAY)
    for bad in ("-1d", "1y", "soon", "0d"):
        with pytest.raises(HeimdexError, match="retention age"):
            parse_age(bad)
    with pytest.raises(HeimdexError, match="ORG_UUID"):
        RetentionPolicy.parse("1d", "1d", "acme=1d")


def test_writers_never_wait_on_a_batch_in_flight(engine: Engine) -> None:
    """While a batch holds everything it locks, a submit, a claim, an outcome and a heartbeat
    go through on another connection with `lock_timeout = 1ms`: none of them waits on it."""
    org = uuid.uuid4()
    with engine.begin() as conn:
        for _ in range(3):
            _job(conn, org, JobStatus.SUCCEEDED, 2)
        running = repository.insert_jobs(
            conn, [repository.NewJob(org_id=org, type="noop", params={}, request_fingerprint="r")]
        )
        repository.insert_jobs(
            conn, [repository.NewJob(org_id=org, type="noop", params={}, request_fingerprint="q")]
        )
    assert running
    written: list[object] = []

    def archive(conn: Connection, jobs: Sequence[Row[Any]], events: Sequence[Row[Any]]) -> None:
        with engine.connect() as other:
            other.execute(text("SET lock_timeout = '1ms'"))
            new = repository.NewJob(org_id=org, type="noop", params={}, request_fingerprint="w")
            written.append(repository.insert_jobs(other, [new]))
            claimed = repository.claim(other, worker_id="w", limit=1, lease_seconds=30).jobs
            written.append(claimed)
            written.append(
                repository.renew_leases(other, [claimed[0].lease_token], lease_seconds=30)
            )
            outcome = repository.Outcome(
                job_id=claimed[0].id,
                lease_token=claimed[0].lease_token,
                status=JobStatus.SUCCEEDED,
                attempt=0,
                detail={"action": "succeeded"},
            )
            written.append(repository.write_outcomes(other, [outcome]))
            other.commit()

    assert retention.prune(engine, POLICY, archive=archive).jobs == 3
    assert all(written), written


def _slow_archive(seconds: float) -> retention.Archive:
    """An archive that takes `seconds` per batch: batches of a known least duration."""

    def archive(conn: Connection, jobs: Sequence[Row[Any]], events: Sequence[Row[Any]]) -> None:
        time.sleep(seconds)

    return archive


def test_a_pass_pauses_its_factor_times_each_batch(engine: Engine) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        for age in (2, 3, 4):
            _job(conn, org, JobStatus.SUCCEEDED, age)
    times = _BatchTimes()
    result = retention.prune(
        engine,
        POLICY,
        batch_size=1,
        archive=_slow_archive(0.05),
        observer=times,
        pause_factor=2.0,
    )
    assert (result.jobs, result.batches, result.complete) == (3, 3, True)
    # Three full batches of at least 50 ms, each followed by twice its duration asleep.
    assert len(times.seconds) == 3 and min(times.seconds) >= 0.05
    assert result.paused_seconds >= 2 * sum(times.seconds)
    assert result.seconds >= 3 * sum(times.seconds)


def test_no_pause_at_factor_zero(engine: Engine) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        for age in (2, 3):
            _job(conn, org, JobStatus.SUCCEEDED, age)
    result = retention.prune(engine, POLICY, batch_size=1, pause_factor=0)
    assert (result.jobs, result.paused_seconds) == (2, 0.0)


def test_a_pause_ends_at_the_budget_or_on_stop(engine: Engine) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        for age in (2, 3, 4, 5):
            _job(conn, org, JobStatus.SUCCEEDED, age)
    # A 100x pause after a 50 ms batch would be 5 s: the budget cuts it short.
    result = retention.prune(
        engine,
        POLICY,
        batch_size=1,
        archive=_slow_archive(0.05),
        pause_factor=100,
        budget_seconds=0.5,
    )
    assert not result.complete and result.jobs >= 1
    assert result.seconds < 2.0
    # So does stop(), set here during the first pause.
    times = _BatchTimes()
    result = retention.prune(
        engine,
        POLICY,
        batch_size=1,
        archive=_slow_archive(0.05),
        observer=times,
        pause_factor=100,
        stop=lambda: bool(times.seconds),
    )
    assert not result.complete and result.jobs == 1
    assert result.seconds < 2.0
    with pytest.raises(HeimdexError, match="pause factor"):
        retention.prune(engine, POLICY, pause_factor=-1)


class _BatchTimes:
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def batch(self, status: JobStatus, jobs: int, events: int, seconds: float) -> None:
        self.seconds.append(seconds)

    def finished(self, result: retention.PruneResult) -> None:
        pass


def test_the_pause_factor_setting() -> None:
    assert Settings().retention_pause_factor == retention.DEFAULT_PAUSE_FACTOR
    assert Settings(HEIMDEX_RETENTION_PAUSE_FACTOR="1.5").retention_pause_factor == 1.5
    with pytest.raises(ValidationError):
        Settings(HEIMDEX_RETENTION_PAUSE_FACTOR="-1")
