"""End to end: API -> PostgreSQL <- worker; the worker on threads of this process
(`run_worker`, as the process runs it), or as a real process where a signal or a kill is
what is tested."""

from __future__ import annotations

import signal
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.stack import Processes, ThreadWorkers, auth, wait_for


def _submit(client: TestClient, org: uuid.UUID, body: dict[str, Any]) -> str:
    resp = client.post("/jobs", json=body, headers=auth(org))
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _job(client: TestClient, org: uuid.UUID, job_id: str) -> dict[str, Any]:
    return dict(client.get(f"/jobs/{job_id}", headers=auth(org)).json())


def _events(client: TestClient, org: uuid.UUID, job_id: str) -> list[dict[str, Any]]:
    return list(client.get(f"/jobs/{job_id}/events", headers=auth(org)).json()["items"])


def _status_is(client: TestClient, org: uuid.UUID, job_id: str, *statuses: str) -> Any:
    job = _job(client, org, job_id)
    return job if job["status"] in statuses else None


def test_submit_runs_to_succeeded_with_stage_events(
    client: TestClient, thread_workers: ThreadWorkers, org_id: uuid.UUID
) -> None:
    thread_workers.start()
    job_id = _submit(client, org_id, {"type": "mock_process", "params": {"stage_seconds": 0.02}})
    job = wait_for(lambda: _status_is(client, org_id, job_id, "succeeded"), what="success")
    assert (job["attempt"], job["progress"], job["stage"]) == (0, 100, "indexing")
    assert job["result"] == {"stages": ["extracting", "analyzing", "indexing"], "attempt": 0}
    events = _events(client, org_id, job_id)
    assert [(e["next_status"], (e["detail"] or {}).get("stage")) for e in events] == [
        ("queued", None),
        ("running", None),
        ("running", "extracting"),
        ("running", "analyzing"),
        ("running", "indexing"),
        ("succeeded", None),
    ]


def test_failing_stage_retries_with_exponential_backoff_then_dead_letters(
    client: TestClient, thread_workers: ThreadWorkers, org_id: uuid.UUID
) -> None:
    thread_workers.start()
    job_id = _submit(
        client,
        org_id,
        {
            "type": "mock_process",
            "params": {"stage_seconds": 0.01, "fail_at_stage": "analyzing"},
            "max_attempts": 3,
            "backoff_policy": "exp",
        },
    )
    job = wait_for(lambda: _status_is(client, org_id, job_id, "dead_letter"), what="dead letter")
    assert (job["attempt"], job["max_attempts"]) == (3, 3)
    assert job["last_error"]["code"] == "MOCK_STAGE_FAILED"
    failures = [
        e["detail"] for e in _events(client, org_id, job_id)
        if (e["detail"] or {}).get("action") == "attempt_failed"
    ]  # fmt: skip
    assert [f["attempt"] for f in failures] == [1, 2, 3]
    assert [f.get("retry_in_seconds") for f in failures] == [0.05, 0.1, None]
    claims = [e for e in _events(client, org_id, job_id) if e["next_status"] == "running"]
    assert len([c for c in claims if c["detail"]["action"] == "claimed"]) == 3


def test_cancel_running_job_stops_at_the_next_stage_boundary(
    client: TestClient, thread_workers: ThreadWorkers, org_id: uuid.UUID
) -> None:
    thread_workers.start()
    job_id = _submit(client, org_id, {"type": "mock_process", "params": {"stage_seconds": 0.5}})
    wait_for(lambda: _job(client, org_id, job_id)["stage"] == "extracting", what="first stage")
    resp = client.post(f"/jobs/{job_id}/cancel", headers=auth(org_id))
    assert resp.status_code == 202
    assert resp.json()["cancel_requested"] is True
    job = wait_for(lambda: _status_is(client, org_id, job_id, "canceled"), what="cancellation")
    assert job["stage"] == "extracting"
    assert job["result"] is None
    assert client.post(f"/jobs/{job_id}/cancel", headers=auth(org_id)).status_code == 409


def test_a_job_submitted_while_no_worker_runs_is_claimed_when_one_starts(
    client: TestClient, thread_workers: ThreadWorkers, org_id: uuid.UUID
) -> None:
    job_id = _submit(client, org_id, {"type": "noop"})
    assert _job(client, org_id, job_id)["status"] == "queued"
    thread_workers.start()
    wait_for(lambda: _status_is(client, org_id, job_id, "succeeded"), what="success")
    claims = [e for e in _events(client, org_id, job_id) if e["next_status"] == "running"]
    assert len(claims) == 1


@pytest.mark.slow  # a worker process, killed or signalled
def test_worker_killed_mid_job_is_reaped_and_the_job_recovers(
    client: TestClient, processes: Processes, org_id: uuid.UUID
) -> None:
    doomed = processes.start("worker")
    job_id = _submit(client, org_id, {"type": "mock_process", "params": {"stage_seconds": 0.4}})
    wait_for(lambda: _job(client, org_id, job_id)["stage"] == "analyzing", what="mid-job")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    assert _job(client, org_id, job_id)["status"] == "running"  # nobody knows it died yet
    processes.start("worker")  # its reaper finds the expired lease; then it claims the job
    job = wait_for(lambda: _status_is(client, org_id, job_id, "succeeded"), what="recovery")
    assert job["attempt"] == 1
    assert job["last_error"]["code"] == "LEASE_EXPIRED"
    actions = [(e["detail"] or {}).get("action") for e in _events(client, org_id, job_id)]
    assert actions.count("lease_expired") == 1
    assert actions.count("succeeded") == 1


@pytest.mark.slow  # a worker process, killed or signalled
def test_sigterm_releases_the_running_job_without_counting_an_attempt(
    client: TestClient, processes: Processes, org_id: uuid.UUID
) -> None:
    first = processes.start("worker")
    # The first stage lasts 2 s: a poll delayed past a shorter stage (a loaded CI machine)
    # missed it once, and then waited for a stage already gone.
    job_id = _submit(client, org_id, {"type": "mock_process", "params": {"stage_seconds": 2}})
    wait_for(lambda: _job(client, org_id, job_id)["stage"] == "extracting", what="first stage")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    released = _job(client, org_id, job_id)
    assert (released["status"], released["attempt"]) == ("queued", 0)
    processes.start("worker")
    job = wait_for(lambda: _status_is(client, org_id, job_id, "succeeded"), what="success")
    assert job["attempt"] == 0
