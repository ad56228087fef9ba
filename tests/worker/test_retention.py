"""The workers' keeper runs retention: a finished job leaves the ledger once old enough."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from heimdex.settings import Settings
from tests.stack import ThreadWorkers, auth, wait_for

RETENTION = {
    "HEIMDEX_RETENTION_SUCCEEDED": "1s",
    "HEIMDEX_RETENTION_FAILED": "off",
    "HEIMDEX_RETENTION_INTERVAL_SECONDS": "0.2",
}


def test_the_keeper_deletes_finished_jobs_past_their_age(
    client: TestClient,
    thread_workers: ThreadWorkers,
    org_id: uuid.UUID,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in RETENTION.items():
        monkeypatch.setenv(key, value)
    # Two workers: their keepers take turns through the advisory lock.
    thread_workers.start(Settings())
    thread_workers.start(Settings())
    body = {"type": "mock_process", "params": {"fail_at_stage": "extracting"}, "max_attempts": 1}
    failing = client.post("/jobs", json=body, headers=auth(org_id)).json()["id"]
    wait_for(
        lambda: (
            client.get(f"/jobs/{failing}", headers=auth(org_id)).json()["status"] == "dead_letter"
        ),
        what="the failing job to be dead-lettered",
    )
    done = client.post("/jobs", json={"type": "noop"}, headers=auth(org_id)).json()["id"]
    wait_for(
        lambda: client.get(f"/jobs/{done}", headers=auth(org_id)).status_code == 404,
        what="the succeeded job to be pruned",
    )
    # Pruned after the dead-lettered job had finished for over a second: kept ("off").
    assert client.get(f"/jobs/{failing}", headers=auth(org_id)).json()["status"] == "dead_letter"
    assert client.get(f"/jobs/{failing}/events", headers=auth(org_id)).json()["items"]
