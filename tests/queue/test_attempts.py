"""A worker killed holding a batch it prefetched: only the attempt that began is charged. Real
worker processes on real PostgreSQL, the worker killed by its PID."""

from __future__ import annotations

import signal
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from tests.stack import Processes, auth, wait_for


def _batch(client: TestClient, org: uuid.UUID, jobs: list[dict[str, object]]) -> list[str]:
    resp = client.post("/jobs/batch", json={"jobs": jobs}, headers=auth(org))
    assert resp.status_code == 201, resp.text
    return [item["job"]["id"] for item in resp.json()["items"]]


def _job(client: TestClient, org: uuid.UUID, job_id: str) -> dict[str, object]:
    return dict(client.get(f"/jobs/{job_id}", headers=auth(org)).json())


def _actions(client: TestClient, org: uuid.UUID, job_id: str) -> list[str]:
    events = client.get(f"/jobs/{job_id}/events", headers=auth(org)).json()["items"]
    return [(e["detail"] or {}).get("action") for e in events]


def _count(engine: Engine, sql: str, **params: object) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar() or 0)


@pytest.mark.slow  # worker processes, one killed
def test_a_worker_killed_holding_prefetched_jobs_charges_only_the_one_it_started(
    client: TestClient, processes: Processes, engine: Engine
) -> None:
    org = uuid.uuid4()
    (warm,) = _batch(client, org, [{"type": "noop"}])
    doomed = processes.start("worker", "--concurrency", "1", "--batch", "10")
    # After a short job the worker claims in batches: the slow job and the four behind it.
    wait_for(lambda: _job(client, org, warm)["status"] == "succeeded", what="the warm-up job")
    slow, last_chance, *waiting = _batch(
        client,
        org,
        [
            {"type": "mock_process", "params": {"stage_seconds": 5}},
            {"type": "noop", "max_attempts": 1},
            {"type": "noop"},
            {"type": "noop"},
            {"type": "noop"},
        ],
    )
    prefetched = [last_chance, *waiting]
    wait_for(
        lambda: "progress" in _actions(client, org, slow),
        what="the slow job's handler to start",
    )

    def waiting_unstarted(job_id: str) -> bool:
        job = _job(client, org, job_id)
        return job["status"] == "running" and job["started_at"] is None

    wait_for(
        lambda: all(waiting_unstarted(j) for j in prefetched),
        what="the worker to record the four jobs waiting behind it as not started",
    )
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()

    processes.start("worker", "--concurrency", "2")
    wait_for(
        lambda: all(_job(client, org, j)["status"] == "succeeded" for j in prefetched),
        what="the prefetched jobs to run to completion on the other worker",
    )
    for job_id in prefetched:
        assert _job(client, org, job_id)["attempt"] == 0
        assert _actions(client, org, job_id) == [
            "submitted", "claimed", "returned_unstarted", "claimed", "succeeded",
        ]  # fmt: skip
    wait_for(
        lambda: "lease_expired" in _actions(client, org, slow), what="the slow job to be reaped"
    )
    assert _job(client, org, slow)["attempt"] == 1
    reaped = _count(
        engine,
        "SELECT count(*) FROM job_event WHERE job_id = :id"
        " AND detail_json->>'action' = 'lease_expired' AND (detail_json->>'attempt')::int = 1",
        id=slow,
    )
    assert reaped == 1
