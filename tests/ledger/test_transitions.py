"""The ledger reports its status changes to the hook on its engine once the caller commits, at
once on an autocommit connection, and never after a rollback."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping

import pytest
from sqlalchemy import Engine

from heimdex.ledger import service, transitions
from heimdex.ledger.errors import IdempotencyConflict
from heimdex.ledger.registry import load_registry
from heimdex.ledger.transitions import Transition
from heimdex.models import JobStatus

NOOP = service.JobSpec("noop", {})
URGENT = service.JobSpec("noop", {}, priority=1)
SUBMITTED = Transition("noop", None, JobStatus.QUEUED)


@pytest.fixture
def heard(engine: Engine) -> Counter[Transition]:
    got: Counter[Transition] = Counter()

    def hook(changes: Mapping[Transition, int]) -> None:
        got.update(changes)

    transitions.observe(engine, hook)
    return got


def test_changes_reach_the_hook_when_the_caller_commits(
    engine: Engine, heard: Counter[Transition], org_id: uuid.UUID
) -> None:
    registry = load_registry()
    with engine.connect() as conn:
        service.submit_jobs(conn, registry, org_id=org_id, specs=[NOOP, NOOP])
        assert heard == {}
        conn.commit()
    assert heard == {SUBMITTED: 2}

    with engine.connect() as conn:
        service.submit_job(conn, registry, org_id=org_id, spec=NOOP)
        conn.rollback()
    with engine.begin() as conn:
        service.submit_job(conn, registry, org_id=org_id, spec=NOOP)
        service.submit_job(conn, registry, org_id=org_id, spec=URGENT)
    assert heard == {SUBMITTED: 4}

    keyed = service.JobSpec("noop", {}, idempotency_key="k")
    with engine.begin() as conn:
        service.submit_job(conn, registry, org_id=org_id, spec=keyed)
    with pytest.raises(IdempotencyConflict), engine.begin() as conn:
        service.submit_job(conn, registry, org_id=org_id, spec=URGENT)
        service.submit_job(
            conn,
            registry,
            org_id=org_id,
            spec=service.JobSpec("noop", {}, priority=2, idempotency_key="k"),
        )
    assert heard == {SUBMITTED: 5}  # the refused transaction rolled back

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        service.submit_job(conn, registry, org_id=org_id, spec=NOOP)
        assert heard == {SUBMITTED: 6}


def test_a_failing_hook_does_not_fail_the_commit(engine: Engine, org_id: uuid.UUID) -> None:
    def broken(changes: Mapping[Transition, int]) -> None:
        raise RuntimeError("a bug in a metrics hook")

    transitions.observe(engine, broken)
    with engine.begin() as conn:
        job = service.submit_job(conn, load_registry(), org_id=org_id, spec=NOOP).job
    with engine.connect() as conn:
        assert service.repository.get_job(conn, job.id).status is JobStatus.QUEUED
