"""Input PostgreSQL cannot hold, or that could not be read back (a timestamp past year 9999 in
UTC, a lone surrogate, a NUL character), anywhere in a body, a query or a header: a 422
problem+json naming where, and nothing is stored."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from heimdex_api.auth import ADMIN_ROLE, issue_token
from tests.ops import seed
from tests.stack import SECRET, auth

PROBLEM = "application/problem+json"
JSON = {"Content-Type": "application/json"}


def _admin() -> dict[str, str]:
    token = issue_token(SECRET, org_id=uuid.uuid4(), sub="op", role=ADMIN_ROLE)
    return {"Authorization": f"Bearer {token}"}


def _refused(resp: object, where: str) -> None:
    assert resp.status_code == 422, resp.text  # type: ignore[attr-defined]
    assert resp.headers["content-type"] == PROBLEM  # type: ignore[attr-defined]
    problem = resp.json()  # type: ignore[attr-defined]
    assert problem["type"].endswith("/validation-error"), problem
    assert where in problem["detail"], problem


def _nothing_stored(client: TestClient, org_id: uuid.UUID) -> None:
    listed = client.get("/jobs", headers=auth(org_id))
    assert listed.status_code == 200, listed.text
    assert listed.json()["items"] == []


def _years_ahead(years: int) -> str:
    return (datetime.now(UTC) + timedelta(days=365.25 * years)).isoformat()


@pytest.mark.parametrize(
    "run_at",
    [
        "9999-12-31T23:59:59-14:00",  # year 10000 in UTC
        "9999-12-31T23:59:59Z",
        "0001-01-01T00:00:00+14:00",  # year 0 in UTC
        "1969-12-31T23:59:59Z",
        "101 years ahead",
    ],
)
def test_a_timestamp_outside_the_window_is_a_422_and_stores_nothing(
    client: TestClient, org_id: uuid.UUID, run_at: str
) -> None:
    if run_at == "101 years ahead":  # the test id is fixed, every xdist worker collects alike
        run_at = _years_ahead(101)
    one = client.post("/jobs", json={"type": "noop", "run_at": run_at}, headers=auth(org_id))
    _refused(one, "run_at")
    batch = client.post(
        "/jobs/batch",
        json={"jobs": [{"type": "noop"}, {"type": "noop", "run_at": run_at}]},
        headers=auth(org_id),
    )
    _refused(batch, "jobs.1.run_at")
    _nothing_stored(client, org_id)


def test_the_window_edges_are_accepted(client: TestClient, org_id: uuid.UUID) -> None:
    near = _years_ahead(99)
    for run_at in ("1970-01-01T00:00:00Z", near):
        resp = client.post("/jobs", json={"type": "noop", "run_at": run_at}, headers=auth(org_id))
        assert resp.status_code == 201, resp.text


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (rb'{"type": "noop", "params": {"a": "\ud800"}}', "body.params.a"),
        (rb'{"type": "noop", "params": {"\udfff": 1}}', "body.params"),
        (rb'{"type": "no\udc00op"}', "body.type"),
        (rb'{"type": "noop", "params": {"a": [1, {"b": "x\u0000"}]}}', "body.params.a.1.b"),
        # A surrogate written as raw UTF-8 bytes: Python's JSON decoder lets it through.
        (b'{"type": "noop", "params": {"a": "\xed\xa0\x80"}}', "body.params.a"),
    ],
)
def test_unstorable_text_in_the_body_is_a_422_and_stores_nothing(
    client: TestClient, org_id: uuid.UUID, body: bytes, where: str
) -> None:
    _refused(client.post("/jobs", content=body, headers={**auth(org_id), **JSON}), where)
    batch = b'{"jobs": [{"type": "noop"}, ' + body + b"]}"
    _refused(
        client.post("/jobs/batch", content=batch, headers={**auth(org_id), **JSON}),
        where.replace("body.", "body.jobs.1."),
    )
    _nothing_stored(client, org_id)


def test_a_surrogate_pair_is_text_and_is_stored(client: TestClient, org_id: uuid.UUID) -> None:
    # An escaped backslash before `u0000` is the text `\u0000`, not a NUL.
    body = rb'{"jobs": [{"type": "noop", "idempotency_key": "\ud83d\ude00 \\u0000"}]}'
    resp = client.post("/jobs/batch", content=body, headers={**auth(org_id), **JSON})
    assert resp.status_code == 201, resp.text
    assert resp.json()["items"][0]["job"]["idempotency_key"] == "\U0001f600 \\u0000"


def test_unstorable_text_in_a_header_or_a_batch_key_is_a_422(
    client: TestClient, org_id: uuid.UUID
) -> None:
    headers = {**auth(org_id), **JSON, "Idempotency-Key": "a\x00b"}
    _refused(client.post("/jobs", json={"type": "noop"}, headers=headers), "Idempotency-Key")
    batch = rb'{"jobs": [{"type": "noop", "idempotency_key": "k\ud800"}]}'
    _refused(
        client.post("/jobs/batch", content=batch, headers={**auth(org_id), **JSON}),
        "body.jobs.0.idempotency_key",
    )
    _nothing_stored(client, org_id)


@pytest.mark.parametrize(
    "query", ["type=a%00b", "cursor=%00", "status=queued&type=%00", "limit=1%00"]
)
def test_a_nul_in_the_query_is_a_422(client: TestClient, org_id: uuid.UUID, query: str) -> None:
    resp = client.get(f"/jobs?{query}", headers=auth(org_id))
    _refused(resp, "query.")
    assert "NUL" in resp.json()["detail"]


def test_operator_filters_and_reasons_are_checked_alike(client: TestClient, engine: Engine) -> None:
    (job_id,) = seed.failed(engine, uuid.uuid4())
    admin = _admin()
    for value in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+01:00"):
        _refused(
            client.get("/ops/jobs", params={"created_after": value}, headers=admin),
            "query.created_after",
        )
        _refused(
            client.post(
                "/ops/bulk/cancel", json={"filter": {"created_before": value}}, headers=admin
            ),
            "body.filter.created_before",
        )
    _refused(
        client.post(
            "/ops/bulk/cancel",
            content=rb'{"filter": {"type": "\ud800"}}',
            headers={**admin, **JSON},
        ),
        "body.filter.type",
    )
    _refused(
        client.post(
            f"/ops/jobs/{job_id}/retry",
            content=rb'{"reason": "fixed \u0000"}',
            headers={**admin, **JSON},
        ),
        "body.reason",
    )
    detail = client.get(f"/ops/jobs/{job_id}", headers=admin).json()
    assert detail["job"]["status"] == "dead_letter"


def test_a_dashboard_form_with_a_nul_changes_nothing(client: TestClient, engine: Engine) -> None:
    (job_id,) = seed.failed(engine, uuid.uuid4())
    token = issue_token(SECRET, org_id=uuid.uuid4(), sub="op", role=ADMIN_ROLE)
    assert client.post("/ui/signin", data={"token": token}, follow_redirects=False).is_redirect
    csrf = re.search(r'name="csrf" value="(\w+)"', client.get("/ui").text).group(1)  # type: ignore[union-attr]
    resp = client.post(
        f"/ui/jobs/{job_id}/retry",
        data={"csrf": csrf, "reason": "fixed\x00"},
        follow_redirects=False,
    )
    _refused(resp, "body.reason")
    detail = client.get(f"/ops/jobs/{job_id}", headers=_admin()).json()
    assert detail["job"]["status"] == "dead_letter"
    assert json.dumps(detail).count("fixed") == 0
