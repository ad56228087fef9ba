"""`heimdex_job_transitions_total` hears every path that changes a job's status, each through
its real entrance: the API's submit and cancel, the operators' retry, cancel and requeue (one
job and bulk) in process, and a worker process's claims, outcomes, reaper and retention, as
its metrics endpoint serves them."""

from __future__ import annotations

import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text

from heimdex.ledger import repository
from heimdex_api.auth import ADMIN_ROLE, issue_token
from heimdex_db.localpg import free_port
from tests.stack import SECRET, Processes, auth, wait_for

ADMIN = {
    "Authorization": "Bearer "
    + issue_token(SECRET, org_id=uuid.uuid4(), sub="op-alice", role=ADMIN_ROLE)
}


def _moved(registry: CollectorRegistry, type_: str, before: str, after: str) -> float:
    value = registry.get_sample_value(
        "heimdex_job_transitions_total",
        {"type": type_, "from_status": before, "to_status": after},
    )
    return value or 0.0


def _submit(client: TestClient, org: uuid.UUID, **body: object) -> str:
    resp = client.post("/jobs", json={"type": "noop", **body}, headers=auth(org))
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _status(engine: Engine, job_id: str) -> str | None:
    """The job's status; None once retention deleted it."""
    with engine.connect() as conn:
        status = conn.execute(text("SELECT status FROM job WHERE id = :id"), {"id": job_id})
        return status.scalar()


def test_the_api_and_the_operators_actions_are_counted(
    client: TestClient, engine: Engine, org_id: uuid.UUID
) -> None:
    registry = client.app.state.heimdex.metrics.registry  # type: ignore[attr-defined]
    moved = lambda before, after: _moved(registry, "noop", before, after)  # noqa: E731
    canceled = _submit(client, org_id)
    operator_canceled = _submit(client, org_id)
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    scheduled = _submit(client, org_id, run_at=later)
    assert moved("", "queued") == 3

    assert client.post(f"/jobs/{canceled}/cancel", headers=auth(org_id)).status_code == 200
    assert moved("queued", "canceled") == 1

    def act(job_id: str, action: str) -> None:
        resp = client.post(f"/ops/jobs/{job_id}/{action}", json={"reason": "t"}, headers=ADMIN)
        assert resp.status_code == 200, resp.text

    act(operator_canceled, "cancel")
    assert moved("queued", "canceled") == 2
    act(canceled, "retry")
    assert moved("canceled", "queued") == 1
    act(scheduled, "requeue")
    assert moved("queued", "queued") == 1

    bulk = client.post(
        "/ops/bulk/retry",
        json={"filter": {"states": ["canceled"], "org_id": str(org_id)}, "reason": "t"},
        headers=ADMIN,
    )
    assert bulk.status_code == 200 and bulk.json()["jobs"] == 1, bulk.text
    assert moved("canceled", "queued") == 2
    assert _status(engine, operator_canceled) == "queued"

    # What a refused or rolled-back action did not do is not counted.
    refused = client.post(f"/jobs/{canceled}/cancel", headers=auth(uuid.uuid4()))
    assert refused.status_code == 404
    assert moved("queued", "canceled") == 2


def _scraped(port: int) -> dict[tuple[str, str, str], float]:
    """The worker's transition samples as its metrics endpoint serves them."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            exposition = resp.read().decode()
    except OSError:
        return {}
    return {
        (s.labels["type"], s.labels["from_status"], s.labels["to_status"]): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == "heimdex_job_transitions_total"
    }


@pytest.mark.slow  # a worker process, scraped on its metrics port
def test_the_workers_claims_outcomes_reaper_and_retention_are_counted(
    client: TestClient, processes: Processes, engine: Engine, org_id: uuid.UUID
) -> None:
    abandoned = _submit(client, org_id)
    # A worker that claimed it and is gone: its lease has expired.
    with engine.begin() as conn:
        (lost,) = repository.claim(conn, worker_id="gone", limit=1, lease_seconds=0.0).jobs
    assert str(lost.id) == abandoned
    failing = _submit(
        client,
        org_id,
        type="mock_process",
        params={"stage_seconds": 0, "fail_at_stage": "extracting"},
        max_attempts=1,
    )
    port = free_port()
    processes.start(
        "worker",
        env={
            "HEIMDEX_WORKER_METRICS_PORT": str(port),
            "HEIMDEX_RETENTION_SUCCEEDED": "1s",
            "HEIMDEX_RETENTION_INTERVAL_SECONDS": "0.2",
        },
    )
    wait_for(lambda: _status(engine, failing) == "dead_letter", what="the dead letter")
    wait_for(
        lambda: _status(engine, abandoned) is None,
        what="the reaped job to run again, succeed and be deleted by retention",
    )
    counted = {
        ("noop", "running", "queued"): "the reaper's requeue",
        ("noop", "queued", "running"): "the worker's claim",
        ("noop", "running", "succeeded"): "the worker's success",
        ("mock_process", "queued", "running"): "the worker's claim",
        ("mock_process", "running", "dead_letter"): "the worker's failure",
        ("noop", "succeeded", ""): "retention's delete",
    }
    for labels, what in counted.items():
        wait_for(
            partial(lambda key: _scraped(port).get(key) == 1, labels),
            what=f"{what} ({labels[1] or '-'} -> {labels[2] or '-'}) to be counted once",
        )
