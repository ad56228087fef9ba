"""The jobs API over real PostgreSQL and Redis (no worker: jobs stay queued)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from heimdex_api.auth import decode_token
from heimdex_api.cli import dev_token
from tests.stack import SECRET, RedisServer, auth

BODY = {"type": "mock_process", "params": {"stage_seconds": 0.01}}
PROBLEM = "application/problem+json"


def _submit(client: TestClient, org: uuid.UUID, body: dict[str, object] = BODY, **headers: str):  # type: ignore[no-untyped-def]
    return client.post("/jobs", json=body, headers={**auth(org), **headers})


def test_submit_writes_job_event_and_outbox_in_one_go(
    client: TestClient, org_id: uuid.UUID, engine: Engine
) -> None:
    resp = _submit(client, org_id)
    assert resp.status_code == 201
    job = resp.json()
    assert job["status"] == "queued"
    assert job["params"] == {"stage_seconds": 0.01, "fail_at_stage": None}
    assert job["org_id"] == str(org_id)
    with engine.connect() as conn:
        assert (
            conn.execute(
                text("SELECT count(*) FROM job_outbox WHERE job_id = :id AND sent_at IS NULL"),
                {"id": job["id"]},
            ).scalar()
            == 1
        )
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
        assert conn.execute(text("SELECT count(*) FROM job_outbox")).scalar() == 1


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


def test_readyz_reports_redis_down_and_health_stays_up(
    client: TestClient, redis_server: RedisServer
) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"postgres": "ok", "schema": "ok", "redis": "ok"}
    redis_server.stop()
    down = client.get("/readyz")
    assert down.status_code == 503
    assert "redis" in down.json()["detail"]
    assert client.get("/healthz").status_code == 200


def test_readyz_reports_a_schema_behind_head(client: TestClient, engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE heimdex_private.alembic_version SET version_num = '3af4686817cc'")
        )
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert "schema: at 3af4686817cc, expected" in resp.json()["detail"]


def test_metrics_expose_ledger_gauges(client: TestClient, org_id: uuid.UUID) -> None:
    _submit(client, org_id)
    text_ = client.get("/metrics").text
    assert 'heimdex_jobs{status="queued",type="mock_process"} 1.0' in text_
    assert "heimdex_outbox_pending 1.0" in text_


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
