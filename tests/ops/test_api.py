"""The operator API: role checks (403 problem+json), reads across orgs, actions with the
caller's `sub` as the actor."""

from __future__ import annotations

import uuid

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from heimdex.ledger import repository
from heimdex_api.auth import ADMIN_ROLE, READONLY_ROLE, decode_token, issue_token
from heimdex_api.cli import dev_token
from tests.ops import seed
from tests.stack import SECRET, auth

PROBLEM = "application/problem+json"


def as_role(role: str, sub: str = "op-alice") -> dict[str, str]:
    token = issue_token(SECRET, org_id=uuid.uuid4(), sub=sub, role=role)
    return {"Authorization": f"Bearer {token}"}


ADMIN = as_role(ADMIN_ROLE)
READONLY = as_role(READONLY_ROLE, "op-bob")
# Fixed, not uuid4(): it is in test ids, which every pytest-xdist worker must collect alike.
NO_SUCH_JOB = uuid.UUID("5e0d1f3a-0000-4000-8000-000000000001")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/ops/jobs", None),
        ("GET", f"/ops/jobs/{NO_SUCH_JOB}", None),
        ("GET", "/ops/stats", None),
        ("GET", "/ops/failures", None),
        ("POST", f"/ops/jobs/{NO_SUCH_JOB}/retry", {"reason": "x"}),
        ("POST", "/ops/bulk/cancel", {"filter": {"type": "noop"}}),
    ],
)
def test_an_ordinary_token_is_refused_with_403_and_no_token_with_401(
    client: TestClient, method: str, path: str, body: object
) -> None:
    refused = client.request(method, path, json=body, headers=auth(uuid.uuid4()))
    assert refused.status_code == 403
    assert refused.headers["content-type"] == PROBLEM
    assert refused.json()["type"].endswith("/forbidden")
    assert "heimdex_admin" in refused.json()["detail"]
    assert client.request(method, path, json=body).status_code == 401


def test_the_readonly_role_reads_but_does_not_act(client: TestClient, engine: Engine) -> None:
    (job_id,) = seed.failed(engine, uuid.uuid4())
    assert client.get("/ops/jobs", headers=READONLY).json()["items"][0]["id"] == str(job_id)
    refused = client.post(f"/ops/jobs/{job_id}/retry", json={"reason": "x"}, headers=READONLY)
    assert refused.status_code == 403 and "it has heimdex_operator_readonly" in refused.text
    bulk = client.post(
        "/ops/bulk/retry", json={"filter": {"ids": [str(job_id)]}, "reason": "x"}, headers=READONLY
    )
    assert bulk.status_code == 403


def test_reads_span_every_org(client: TestClient, engine: Engine) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    dead = seed.failed(engine, a, 2)
    seed.queued(engine, b, 3)
    page = client.get("/ops/jobs", params={"limit": 4}, headers=ADMIN).json()
    assert len(page["items"]) == 4 and page["next_cursor"]
    rest = client.get(
        "/ops/jobs", params={"limit": 4, "cursor": page["next_cursor"]}, headers=ADMIN
    ).json()
    assert len(rest["items"]) == 1 and rest["next_cursor"] is None
    only = client.get(
        "/ops/jobs", params={"status": "dead_letter", "org_id": str(a)}, headers=ADMIN
    ).json()["items"]
    assert sorted(j["id"] for j in only) == sorted(map(str, dead))
    detail = client.get(f"/ops/jobs/{dead[0]}", headers=READONLY).json()
    assert detail["job"]["last_error"]["code"] == "UPSTREAM_TIMEOUT"
    assert [e["next_status"] for e in detail["events"]] == ["queued", "running", "dead_letter"]
    groups = client.get("/ops/failures", headers=READONLY).json()["items"]
    assert [(g["error_code"], g["jobs"]) for g in groups] == [("UPSTREAM_TIMEOUT", 2)]
    assert groups[0]["fingerprint"] == detail["error_fingerprint"]
    stats = client.get("/ops/stats", params={"minutes": 5}, headers=READONLY).json()
    assert stats["by_status"]["queued"] == 3 and stats["by_status"]["dead_letter"] == 2
    assert set(stats["by_org"]) == {str(a), str(b)} and len(stats["per_minute"]) == 5
    assert client.get(f"/ops/jobs/{uuid.uuid4()}", headers=ADMIN).status_code == 404


def test_admin_retries_one_job_and_a_group_with_a_count_first(
    client: TestClient, engine: Engine
) -> None:
    org = uuid.uuid4()
    first, *_ = seed.failed(engine, org, 4)
    no_reason = client.post(f"/ops/jobs/{first}/retry", json={}, headers=ADMIN)
    assert no_reason.status_code == 400 and "needs a reason" in no_reason.json()["detail"]
    done = client.post(f"/ops/jobs/{first}/retry", json={"reason": "fixed"}, headers=ADMIN)
    assert (done.status_code, done.json()["status"], done.json()["attempt"]) == (200, "queued", 0)
    with engine.connect() as conn:
        detail = repository.list_events(conn, first)[-1].detail_json
    assert (detail["actor"], detail["reason"]) == ("op-alice", "fixed")
    again = client.post(f"/ops/jobs/{first}/retry", json={"reason": "x"}, headers=ADMIN)
    assert again.status_code == 409 and again.json()["type"].endswith("/not-eligible")
    fp = client.get("/ops/failures", headers=ADMIN).json()["items"][0]["fingerprint"]
    body = {"filter": {"fingerprint": fp}, "reason": "upstream back"}
    preview = client.post("/ops/bulk/retry", json={**body, "dry_run": True}, headers=ADMIN)
    assert preview.json() == {"action": "retry", "dry_run": True, "jobs": 3, "batches": 0}
    ran = client.post("/ops/bulk/retry", json={**body, "batch_size": 2}, headers=ADMIN).json()
    assert (ran["jobs"], ran["batches"]) == (3, 2)
    empty = client.post("/ops/bulk/cancel", json={"filter": {}}, headers=ADMIN)
    assert empty.status_code == 400 and "at least one filter" in empty.json()["detail"]
    assert client.post("/ops/bulk/explode", json=body, headers=ADMIN).status_code == 422


def test_cancel_of_a_finished_job_is_409(client: TestClient, engine: Engine) -> None:
    (job_id,) = seed.failed(engine, uuid.uuid4())
    resp = client.post(f"/ops/jobs/{job_id}/cancel", json={}, headers=ADMIN)
    assert resp.status_code == 409 and resp.json()["type"].endswith("/job-finished")


def test_dev_token_issues_an_operator_role(settings: object) -> None:
    org = uuid.uuid4()
    out = CliRunner().invoke(dev_token, ["--org", str(org), "--role", ADMIN_ROLE])
    assert out.exit_code == 0, out.output
    principal = decode_token(out.output.strip(), SECRET)
    assert (principal.org_id, principal.role, principal.is_admin) == (org, ADMIN_ROLE, True)
    plain = CliRunner().invoke(dev_token, ["--org", str(org)]).output.strip()
    assert not decode_token(plain, SECRET).is_operator


def test_bulk_filters_by_status_as_the_list_does_and_a_dry_run_needs_no_reason(
    client: TestClient, engine: Engine
) -> None:
    org = uuid.uuid4()
    dead = seed.failed(engine, org, 2)
    seed.queued(engine, org, 1)
    for key in ("status", "states"):  # `states`: the older spelling, still read
        body = {"filter": {key: ["dead_letter"], "org_id": str(org)}, "dry_run": True}
        preview = client.post("/ops/bulk/retry", json=body, headers=ADMIN)
        assert preview.status_code == 200, preview.json()
        assert preview.json()["jobs"] == 2
    body = {"filter": {"status": ["dead_letter"], "org_id": str(org)}}
    refused = client.post("/ops/bulk/retry", json=body, headers=ADMIN)
    assert refused.status_code == 400 and "needs a reason" in refused.json()["detail"]
    with engine.connect() as conn:
        assert {repository.get_job(conn, j).status.value for j in dead} == {"dead_letter"}
    schema = client.get("/openapi.json").json()["components"]["schemas"]["Filter"]
    assert "status" in schema["properties"] and "states" not in schema["properties"]
