"""The ledger repository: idempotency, the state machine, and events in the same transaction."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from heimdex_common import ledger
from heimdex_common.ledger import DuplicateIdempotencyKey, IllegalTransition, JobNotFound
from heimdex_common.models import TERMINAL_STATUSES, Job, JobEvent, JobStatus


def _event_count(session: Session, job_id: uuid.UUID) -> int:
    return session.scalar(select(func.count()).where(JobEvent.job_id == job_id)) or 0


def test_create_without_key_always_creates(session: Session, org_id: uuid.UUID) -> None:
    a = ledger.create_job(session, org_id=org_id, type="noop")
    b = ledger.create_job(session, org_id=org_id, type="noop")
    session.commit()
    assert a.id != b.id
    assert a.status is JobStatus.QUEUED
    events = ledger.list_events(session, a.id)
    assert [(e.prev_status, e.next_status) for e in events] == [(None, "queued")]


def test_duplicate_key_in_same_org_is_a_domain_error(session: Session, org_id: uuid.UUID) -> None:
    first = ledger.create_job(session, org_id=org_id, type="noop", idempotency_key="k1")
    with pytest.raises(DuplicateIdempotencyKey):
        ledger.create_job(session, org_id=org_id, type="noop", idempotency_key="k1")
    # The caller's transaction survives the refused insert.
    other = ledger.create_job(session, org_id=uuid.uuid4(), type="noop", idempotency_key="k1")
    session.commit()
    assert other.id != first.id
    assert session.scalar(select(func.count()).select_from(Job)) == 2


def test_full_lifecycle_records_one_event_per_transition(
    session: Session, org_id: uuid.UUID
) -> None:
    job = ledger.create_job(session, org_id=org_id, type="noop")
    ledger.transition(session, job, JobStatus.RUNNING, detail={"stage": "extracting"})
    assert job.started_at is not None
    ledger.transition(session, job, JobStatus.QUEUED, error_code="TIMEOUT", error_message="slow")
    assert job.finished_at is None
    ledger.transition(session, job, JobStatus.RUNNING)
    ledger.transition(session, job, JobStatus.SUCCEEDED)
    session.commit()
    assert job.finished_at is not None
    assert job.last_error_code == "TIMEOUT"
    events = ledger.list_events(session, job.id)
    assert [(e.prev_status, e.next_status) for e in events] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    assert events[2].detail_json == {"error": {"code": "TIMEOUT", "message": "slow"}}


@pytest.mark.parametrize("terminal", sorted(TERMINAL_STATUSES))
def test_terminal_states_have_no_way_out(
    session: Session, org_id: uuid.UUID, terminal: JobStatus
) -> None:
    job = ledger.create_job(session, org_id=org_id, type="noop")
    if terminal is not JobStatus.CANCELED:
        ledger.transition(session, job, JobStatus.RUNNING)
    ledger.transition(session, job, terminal)
    for target in JobStatus:
        with pytest.raises(IllegalTransition):
            ledger.transition(session, job, target)
    assert job.status is terminal


def test_queued_cannot_succeed_directly(session: Session, org_id: uuid.UUID) -> None:
    job = ledger.create_job(session, org_id=org_id, type="noop")
    with pytest.raises(IllegalTransition, match="queued -> succeeded"):
        ledger.transition(session, job, JobStatus.SUCCEEDED)
    assert _event_count(session, job.id) == 1


def test_transition_and_event_share_the_callers_transaction(
    session: Session, org_id: uuid.UUID
) -> None:
    job = ledger.create_job(session, org_id=org_id, type="noop")
    session.commit()
    ledger.transition(session, job, JobStatus.RUNNING)
    session.rollback()
    fresh = ledger.get_job(session, job.id)
    assert fresh.status is JobStatus.QUEUED
    assert _event_count(session, job.id) == 1


def test_long_errors_are_cut_in_the_row_and_kept_in_the_event(
    session: Session, org_id: uuid.UUID
) -> None:
    job = ledger.create_job(session, org_id=org_id, type="noop")
    ledger.transition(session, job, JobStatus.RUNNING)
    message = "x" * 5000
    event = ledger.transition(
        session, job, JobStatus.FAILED, error_code="C" * 80, error_message=message
    )
    session.commit()
    assert job.last_error_message is not None
    assert len(job.last_error_message) == 2048
    assert job.last_error_code == "C" * 64
    assert event.detail_json is not None
    assert event.detail_json["error"]["message"] == message


def test_job_of_another_org_is_not_found(session: Session, org_id: uuid.UUID) -> None:
    job = ledger.create_job(session, org_id=org_id, type="noop")
    assert ledger.get_job(session, job.id, org_id=org_id) is job
    with pytest.raises(JobNotFound):
        ledger.get_job(session, job.id, org_id=uuid.uuid4())
