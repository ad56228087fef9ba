"""The jobs API over real PostgreSQL (no worker: jobs stay queued)."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg
import pydantic_core
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from heimdex.ledger import repository
from heimdex_api.auth import decode_token
from heimdex_api.cli import dev_token
from heimdex_api.schemas import JobOut, job_fields
from tests.stack import SECRET, auth

BODY = {"type": "mock_process", "params": {"stage_seconds": 0.01}}
PROBLEM = "application/problem+json"


def _submit(client: TestClient, org: uuid.UUID, body: dict[str, object] = BODY, **headers: str):  # type: ignore[no-untyped-def]
    return client.post("/jobs", json=body, headers={**auth(org), **headers})


def test_submit_writes_the_job_and_its_event_and_wakes_workers(
    client: TestClient, org_id: uuid.UUID, engine: Engine
) -> None:
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    listener = psycopg.connect(url, autocommit=True)
    listener.execute("LISTEN heimdex_jobs")
    resp = _submit(client, org_id)
    woken = list(listener.notifies(timeout=5, stop_after=1))
    listener.close()
    assert [n.channel for n in woken] == ["heimdex_jobs"]
    assert resp.status_code == 201
    job = resp.json()
    assert job["status"] == "queued"
    assert job["params"] == {"stage_seconds": 0.01, "fail_at_stage": None}
    assert job["org_id"] == str(org_id)
    assert job["run_at"] <= job["updated_at"]
    events = client.get(f"/jobs/{job['id']}/events", headers=auth(org_id)).json()["items"]
    assert [(e["prev_status"], e["next_status"]) for e in events] == [(None, "queued")]


def test_idempotency_same_body_returns_the_job_and_other_body_conflicts(
    client: TestClient, org_id: uuid.UUID
) -> None:
    first = _submit(client, org_id, **{"Idempotency-Key": "k-1"})
    again = _submit(
        client,
        org_id,
        {"params": {"stage_seconds": 0.01}, "type": "mock_process", "priority": 0},
        **{"Idempotency-Key": "k-1"},
    )
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    clash = _submit(client, org_id, {**BODY, "priority": 5}, **{"Idempotency-Key": "k-1"})
    assert clash.status_code == 409
    assert clash.headers["content-type"] == PROBLEM
    assert first.json()["id"] in clash.json()["detail"]
    other_org = _submit(client, uuid.uuid4(), **{"Idempotency-Key": "k-1"})
    assert other_org.status_code == 201
    assert other_org.json()["id"] != first.json()["id"]
    no_key = [_submit(client, org_id).json()["id"] for _ in range(2)]
    assert len(set(no_key)) == 2


def test_concurrent_identical_submissions_create_exactly_one_job(
    client: TestClient, org_id: uuid.UUID, engine: Engine
) -> None:
    with ThreadPoolExecutor(max_workers=40) as pool:
        responses = list(
            pool.map(lambda _: _submit(client, org_id, **{"Idempotency-Key": "burst"}), range(40))
        )
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 39 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM job")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM job_event")).scalar() == 1


def test_another_orgs_job_does_not_exist_on_any_endpoint(
    client: TestClient, org_id: uuid.UUID
) -> None:
    job_id = _submit(client, org_id).json()["id"]
    intruder = auth(uuid.uuid4())
    for method, path in (
        ("GET", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/events"),
        ("POST", f"/jobs/{job_id}/cancel"),
    ):
        resp = client.request(method, path, headers=intruder)
        assert resp.status_code == 404, path
        assert resp.headers["content-type"] == PROBLEM
    assert client.get("/jobs", headers=intruder).json()["items"] == []
    assert client.get(f"/jobs/{job_id}", headers=auth(org_id)).json()["status"] == "queued"


def test_cancel_queued_at_once_and_finished_is_409(client: TestClient, org_id: uuid.UUID) -> None:
    job_id = _submit(client, org_id).json()["id"]
    resp = client.post(f"/jobs/{job_id}/cancel", headers=auth(org_id))
    assert resp.status_code == 200
    assert resp.json()["status"] == "canceled"
    assert resp.json()["finished_at"] is not None
    again = client.post(f"/jobs/{job_id}/cancel", headers=auth(org_id))
    assert again.status_code == 409
    assert "canceled" in again.json()["detail"]


def test_list_is_newest_first_filtered_and_cursor_paginated(
    client: TestClient, org_id: uuid.UUID
) -> None:
    ids = [_submit(client, org_id).json()["id"] for _ in range(5)]
    noop = _submit(client, org_id, {"type": "noop"}).json()["id"]
    client.post(f"/jobs/{ids[0]}/cancel", headers=auth(org_id))
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"limit": 2, "type": "mock_process"}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/jobs", params=params, headers=auth(org_id)).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    canceled = client.get("/jobs", params={"status": "canceled"}, headers=auth(org_id)).json()
    assert [i["id"] for i in canceled["items"]] == [ids[0]]
    everything = client.get("/jobs", headers=auth(org_id)).json()["items"]
    assert everything[0]["id"] == noop


def test_bad_inputs_are_4xx_problem_details(client: TestClient, org_id: uuid.UUID) -> None:
    h = auth(org_id)
    cases = [
        (client.post("/jobs", json={"type": "nope"}, headers=h), 422, "unknown job type"),
        (client.post("/jobs", json={"type": "noop", "params": {"x": 1}}, headers=h), 422, "x"),
        (
            client.post(
                "/jobs",
                json={"type": "mock_process", "params": {"fail_at_stage": "later"}},
                headers=h,
            ),
            422,
            "fail_at_stage",
        ),
        (client.post("/jobs", json={"type": "x" * 101}, headers=h), 422, "type"),
        (
            client.post("/jobs", json={"type": "noop", "params": {"k": "v" * 70_000}}, headers=h),
            422,
            "limit",
        ),
        (client.post("/jobs", json={"type": "noop", "max_attempts": 0}, headers=h), 422, "max"),
        (
            client.post(
                "/jobs", content=b"{not json", headers={**h, "Content-Type": "application/json"}
            ),
            422,
            "JSON",
        ),
        (
            client.post(
                "/jobs", content=b"x" * 300_000, headers={**h, "Content-Type": "application/json"}
            ),
            413,
            "bytes",
        ),
        (
            client.post(
                "/jobs", json={"type": "noop"}, headers={**h, "Idempotency-Key": "k" * 256}
            ),
            400,
            "Idempotency-Key",
        ),
        (client.get("/jobs/not-a-uuid", headers=h), 422, "UUID"),
        (client.get(f"/jobs/{uuid.uuid4()}", headers=h), 404, "not found"),
        (client.get("/jobs", params={"cursor": "garbage!"}, headers=h), 400, "cursor"),
        (client.get("/jobs", params={"status": "sleeping"}, headers=h), 422, "status"),
        (client.get("/jobs"), 401, "Authorization"),
        (client.get("/jobs", headers={"Authorization": "Bearer abc"}), 401, "invalid"),
        (client.get("/jobs", headers={"Authorization": "Basic abc"}), 401, "Bearer"),
    ]
    for resp, status, needle in cases:
        assert resp.status_code == status, (resp.request.url, resp.text)
        assert resp.headers["content-type"] == PROBLEM
        body = resp.json()
        assert body["status"] == status
        assert needle in body["detail"], body


def test_token_of_another_secret_or_without_org_is_refused(client: TestClient) -> None:
    import jwt

    forged = jwt.encode({"sub": "x", "org_id": str(uuid.uuid4())}, "other" * 8, "HS256")
    no_org = jwt.encode({"sub": "x"}, SECRET, "HS256")
    for token in (forged, no_org):
        resp = client.get("/jobs", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"] == "Bearer"


def test_a_token_accepted_once_is_refused_once_it_expires(client: TestClient) -> None:
    """Verified tokens are remembered (auth.decode_token); expiry is still checked per call."""
    import jwt

    org = uuid.uuid4()
    token = jwt.encode({"sub": "x", "org_id": str(org), "exp": time.time() + 1.5}, SECRET, "HS256")
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post("/jobs", json={"type": "noop"}, headers=headers).status_code == 201
    assert client.get("/jobs", headers=headers).status_code == 200
    time.sleep(1.6)
    for resp in (
        client.get("/jobs", headers=headers),
        client.post("/jobs", json={"type": "noop"}, headers=headers),
    ):
        assert resp.status_code == 401, resp.text
        assert "expired" in resp.json()["detail"]
    # The same claims signed with another secret were never verified: refused.
    other = jwt.encode({"sub": "x", "org_id": str(org)}, "other" * 8, "HS256")
    assert decode_token(jwt.encode({"sub": "x", "org_id": str(org)}, SECRET, "HS256"), SECRET)
    resp = client.get("/jobs", headers={"Authorization": f"Bearer {other}"})
    assert resp.status_code == 401


def test_readyz_checks_postgres_and_schema_only(client: TestClient) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"postgres": "ok", "schema": "ok"}
    assert client.get("/healthz").status_code == 200


def test_readyz_reports_a_schema_behind_head(client: TestClient, engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE heimdex_private.alembic_version SET version_num = '3af4686817cc'")
        )
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert "schema: at 3af4686817cc, expected" in resp.json()["detail"]


def test_readyz_is_ready_on_a_schema_ahead_of_this_code(client: TestClient, engine: Engine) -> None:
    # A revision this code does not know: a newer release's expand revisions, applied while this
    # release still serves (a rolling deploy); contract revisions wait until it is gone.
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE heimdex_private.alembic_version SET version_num = 'feedc0ffee42'")
        )
    resp = client.get("/readyz")
    assert resp.status_code == 200, resp.text
    assert resp.json()["checks"] == {"postgres": "ok", "schema": "ok"}


def test_metrics_expose_the_queue_per_type(client: TestClient, org_id: uuid.UUID) -> None:
    _submit(client, org_id)
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    client.post(
        "/jobs", json={"type": "noop", "run_at": later}, headers=auth(org_id)
    ).raise_for_status()
    client.get("/jobs/not-a-uuid", headers=auth(org_id))
    text_ = client.get("/metrics").text
    assert 'heimdex_http_requests_total{method="POST",route="/jobs",status="201"} 2.0' in text_
    assert 'route="/jobs/{job_id}",status="422"} 1.0' in text_
    assert 'heimdex_queue_jobs{type="mock_process"} 1.0' in text_
    assert 'heimdex_queue_jobs{type="noop"} 1.0' in text_
    assert 'heimdex_queue_due_jobs{type="noop"} 0.0' in text_
    assert 'heimdex_queue_oldest_due_seconds{type="mock_process"}' in text_
    assert 'heimdex_job_transitions_total{from_status="",to_status="queued",type="noop"} 1.0' in (
        text_
    )


def test_run_at_is_stored_and_must_carry_an_offset(client: TestClient, org_id: uuid.UUID) -> None:
    later = datetime.now(UTC) + timedelta(minutes=5)
    resp = client.post(
        "/jobs", json={"type": "noop", "run_at": later.isoformat()}, headers=auth(org_id)
    )
    assert resp.status_code == 201, resp.text
    assert datetime.fromisoformat(resp.json()["run_at"]) == later
    naive = client.post(
        "/jobs", json={"type": "noop", "run_at": "2030-01-01T00:00:00"}, headers=auth(org_id)
    )
    assert naive.status_code == 422


def test_batch_submits_all_or_nothing_with_per_item_keys(
    client: TestClient, org_id: uuid.UUID, engine: Engine
) -> None:
    jobs = [{"type": "noop"}, {"type": "noop", "idempotency_key": "b-1"}, {"type": "noop"}]
    first = client.post("/jobs/batch", json={"jobs": jobs}, headers=auth(org_id))
    assert first.status_code == 201, first.text
    items = first.json()["items"]
    assert [(i["index"], i["created"]) for i in items] == [(0, True), (1, True), (2, True)]
    replay = client.post("/jobs/batch", json={"jobs": jobs[1:2]}, headers=auth(org_id))
    assert replay.status_code == 200
    assert replay.json()["items"][0]["job"]["id"] == items[1]["job"]["id"]
    bad = [{"type": "noop"}, {"type": "mock_process", "params": {"stage_seconds": -1}}]
    refused = client.post("/jobs/batch", json={"jobs": bad}, headers=auth(org_id))
    assert refused.status_code == 422
    assert "jobs[1]" in refused.json()["detail"]
    too_many = client.post(
        "/jobs/batch", json={"jobs": [{"type": "noop"}] * 1001}, headers=auth(org_id)
    )
    assert too_many.status_code == 422
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM job")).scalar() == 3


def test_submit_responses_are_the_job_models_json(
    client: TestClient, org_id: uuid.UUID, engine: Engine
) -> None:
    """The submit paths serialize `job_fields` without building `JobOut`s; the JSON must be
    what the model gives (and what GET returns) for every kind of row."""
    jobs = [{"type": "noop", "priority": 3}, {"type": "noop", "idempotency_key": "pin-1"}]
    batch = client.post("/jobs/batch", json={"jobs": jobs}, headers=auth(org_id)).json()
    single = _submit(client, org_id).json()
    ids = [item["job"]["id"] for item in batch["items"]] + [single["id"]]
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE job SET status = 'failed', last_error_code = 'boom', "
                "last_error_message = 'it broke', result = '{\"n\": [1, 2.5]}', "
                "started_at = now(), finished_at = now() WHERE id = :id"
            ),
            {"id": ids[0]},
        )
        rows = [repository.get_job(conn, uuid.UUID(i)) for i in ids]
    for row in rows:
        via_model = json.loads(JobOut.of(row).model_dump_json())
        assert json.loads(pydantic_core.to_json(job_fields(row))) == via_model
        assert client.get(f"/jobs/{row.id}", headers=auth(org_id)).json() == via_model
    failed = json.loads(pydantic_core.to_json(job_fields(rows[0])))
    assert failed["last_error"] == {"code": "boom", "message": "it broke"}
    assert failed["result"] == {"n": [1, 2.5]}
    # Fresh rows: the submit responses themselves equal GET's.
    assert batch["items"][1]["job"] == client.get(f"/jobs/{ids[1]}", headers=auth(org_id)).json()
    assert single == client.get(f"/jobs/{ids[2]}", headers=auth(org_id)).json()


def test_dev_token_signs_for_the_org_and_refuses_prod(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    org = uuid.uuid4()
    monkeypatch.setenv("HEIMDEX_JWT_SECRET", SECRET)
    monkeypatch.setenv("HEIMDEX_ENV", "local")
    result = CliRunner().invoke(dev_token, ["--org", str(org)])
    assert result.exit_code == 0, result.output
    assert decode_token(result.output.strip(), SECRET).org_id == org
    bad = CliRunner().invoke(dev_token, ["--org", "nope"])
    assert bad.exit_code != 0
    monkeypatch.setenv("HEIMDEX_ENV", "prod")
    refused = CliRunner().invoke(dev_token, ["--org", str(org)])
    assert refused.exit_code != 0
    assert "prod" in str(refused.exception)
