"""The shared rules: fingerprint, backoff, job type contract, reaper, outbox dispatch."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.orm import Session

from heimdex_common.ledger import service
from heimdex_common.ledger.backoff import retry_delay
from heimdex_common.ledger.errors import InvalidParams, LeaseLost, UnknownJobType
from heimdex_common.ledger.fingerprint import request_fingerprint
from heimdex_common.ledger.jobtypes import JOB_TYPES, validate_params
from heimdex_common.ledger.outbox import dispatch_due
from heimdex_common.models import BackoffPolicy, JobOutbox, JobStatus
from heimdex_worker.handlers import HANDLERS


def test_fingerprint_ignores_key_order_and_sees_every_value() -> None:
    a = request_fingerprint({"type": "noop", "params": {"a": 1, "b": [1, 2]}})
    assert a == request_fingerprint({"params": {"b": [1, 2], "a": 1}, "type": "noop"})
    assert a != request_fingerprint({"type": "noop", "params": {"a": 1, "b": [2, 1]}})
    assert len(a) == 64


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (BackoffPolicy.NONE, [0.0, 0.0, 0.0, 0.0]),
        (BackoffPolicy.FIXED, [2.0, 2.0, 2.0, 2.0]),
        (BackoffPolicy.EXP, [2.0, 4.0, 8.0, 10.0]),
    ],
)
def test_retry_delay_per_policy_is_capped(policy: BackoffPolicy, expected: list[float]) -> None:
    assert [retry_delay(policy, n, base=2.0, cap=10.0) for n in (1, 2, 3, 4)] == expected
    with pytest.raises(ValueError, match="starts at 1"):
        retry_delay(policy, 0, base=2.0, cap=10.0)


def test_every_job_type_has_a_worker_handler() -> None:
    assert set(JOB_TYPES) == set(HANDLERS)
    with pytest.raises(UnknownJobType, match="known types: mock_process, noop"):
        validate_params("transcode", {})
    with pytest.raises(InvalidParams, match="stage_seconds"):
        validate_params("mock_process", {"stage_seconds": -1})


def test_reaper_requeues_expired_leases_and_dead_letters_the_last_attempt(
    session: Session, org_id: uuid.UUID
) -> None:
    policy = service.RetryPolicy(base_seconds=1.0, max_seconds=5.0)
    job, _ = service.submit_job(session, org_id=org_id, type="noop", params={}, max_attempts=2)
    for expected_status, expected_attempt in ((JobStatus.QUEUED, 1), (JobStatus.DEAD_LETTER, 2)):
        claimed = service.claim_job(session, job.id, worker_id="w", lease_seconds=0.0)
        assert claimed is not None and claimed.lease_token is not None
        assert service.claim_job(session, job.id, worker_id="w2", lease_seconds=1) is None
        session.commit()
        reaped = service.reap_expired_leases(session, policy=policy, stale_after_seconds=60)
        assert [j.id for j in reaped] == [job.id]
        assert (reaped[0].status, reaped[0].attempt) == (expected_status, expected_attempt)
        assert reaped[0].last_error_code == "LEASE_EXPIRED"
        with pytest.raises(LeaseLost):
            service.complete_attempt(session, job.id, claimed.lease_token, result={})
        session.commit()


def test_dispatch_stops_at_the_first_publish_error_and_keeps_the_rest(
    session: Session, org_id: uuid.UUID
) -> None:
    for _ in range(3):
        service.submit_job(session, org_id=org_id, type="noop", params={})
    session.commit()
    published: list[uuid.UUID] = []

    def flaky(message: JobOutbox) -> None:
        if len(published) == 1:
            raise ConnectionError("broker down")
        published.append(message.job_id)

    result = dispatch_due(session, flaky, limit=10)
    session.commit()
    assert (result.sent, result.error) == (1, "ConnectionError: broker down")
    rest = dispatch_due(session, lambda m: published.append(m.job_id), limit=10)
    session.commit()
    assert rest.sent == 2
    assert len(set(published)) == 3
