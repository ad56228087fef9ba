"""/ops/schedules: an org's periodic schedules through the operator API."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from heimdex.ledger import schedules
from heimdex.settings import Settings
from heimdex_api.app import create_app
from heimdex_api.auth import ADMIN_ROLE, READONLY_ROLE, issue_token
from tests.ops.test_api import PROBLEM, as_role
from tests.stack import SECRET

TYPES = "tests.worker.schedule_types:jobs"
ADMIN = as_role(ADMIN_ROLE)
READONLY = as_role(READONLY_ROLE, "op-bob")


@pytest.fixture
def typed_client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"job_modules": TYPES}))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM job_schedule")).scalar_one())


def test_add_list_pause_resume_remove(typed_client: TestClient, engine: Engine) -> None:
    org = str(uuid.uuid4())
    body = {"org_id": org, "name": "nightly", "type": "minutely", "cron": "0 3 * * *"}
    added = typed_client.post("/ops/schedules", json=body, headers=ADMIN)
    assert added.status_code == 201, added.text
    assert (
        added.json()["next_fire_at"].endswith("03:00:00Z")
        or "T03:00:00" in (added.json()["next_fire_at"])
    )
    assert added.json()["params"] == {"label": "tick"}  # defaults filled in
    listed = typed_client.get("/ops/schedules", headers=READONLY).json()["items"]
    assert [(s["org_id"], s["name"], s["paused"], s["last_job_id"]) for s in listed] == [
        (org, "nightly", False, None)
    ]
    assert typed_client.get(
        "/ops/schedules", params={"org_id": str(uuid.uuid4())}, headers=READONLY
    ).json() == {"items": []}
    paused = typed_client.post(f"/ops/schedules/{org}/nightly/pause", headers=ADMIN)
    assert paused.status_code == 200 and paused.json()["paused"] is True
    resumed = typed_client.post(f"/ops/schedules/{org}/nightly/resume", headers=ADMIN)
    assert resumed.json()["paused"] is False
    assert typed_client.delete(f"/ops/schedules/{org}/nightly", headers=ADMIN).status_code == 204
    assert _count(engine) == 0


def test_the_listing_shows_the_last_job(typed_client: TestClient, engine: Engine) -> None:
    org = uuid.uuid4()
    body = {"org_id": str(org), "name": "m", "type": "minutely", "cron": "* * * * *"}
    assert typed_client.post("/ops/schedules", json=body, headers=ADMIN).status_code == 201
    with engine.begin() as conn:
        conn.execute(text("UPDATE job_schedule SET next_fire_at = now() - interval '5 minutes'"))
    registry = typed_client.app.state.heimdex.registry  # type: ignore[attr-defined]
    with engine.begin() as conn:
        (fired,) = schedules.fire_due(conn, registry)
    (item,) = typed_client.get("/ops/schedules", headers=READONLY).json()["items"]
    assert item["last_job_id"] == str(fired.job_id)
    assert item["last_job_status"] == "queued"


@pytest.mark.parametrize(
    ("change", "status", "slug"),
    [
        ({"cron": "every day"}, 422, "invalid-cron"),
        ({"type": "nope"}, 422, "unknown-job-type"),
        ({"params": {"label": 3}}, 422, "invalid-params"),
        ({"name": "a:b"}, 422, "invalid-schedule-name"),
        ({"name": ""}, 422, "validation"),
    ],
)
def test_bad_schedules_are_refused_and_change_nothing(
    typed_client: TestClient, engine: Engine, change: dict[str, object], status: int, slug: str
) -> None:
    body = {"org_id": str(uuid.uuid4()), "name": "s", "type": "minutely", "cron": "* * * * *"}
    refused = typed_client.post("/ops/schedules", json={**body, **change}, headers=ADMIN)
    assert refused.status_code == status, refused.text
    assert refused.headers["content-type"] == PROBLEM
    assert slug in refused.json()["type"]
    assert _count(engine) == 0


def test_roles_missing_schedules_and_duplicates(typed_client: TestClient) -> None:
    org = str(uuid.uuid4())
    body = {"org_id": org, "name": "s", "type": "minutely", "cron": "* * * * *"}
    assert typed_client.post("/ops/schedules", json=body, headers=READONLY).status_code == 403
    assert typed_client.post("/ops/schedules", json=body, headers=ADMIN).status_code == 201
    again = typed_client.post("/ops/schedules", json=body, headers=ADMIN)
    assert again.status_code == 409 and again.json()["type"].endswith("/schedule-exists")
    missing = typed_client.post(f"/ops/schedules/{org}/ghost/pause", headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["type"].endswith("/schedule-not-found")
    assert typed_client.delete(f"/ops/schedules/{org}/ghost", headers=ADMIN).status_code == 404
    assert typed_client.delete(f"/ops/schedules/{org}/s", headers=READONLY).status_code == 403


def test_the_dashboard_lists_schedules_with_next_fire_and_last_job(
    typed_client: TestClient, engine: Engine
) -> None:
    org = uuid.uuid4()
    body = {"org_id": str(org), "name": "hourly-<b>", "type": "minutely", "cron": "0 * * * *"}
    assert typed_client.post("/ops/schedules", json=body, headers=ADMIN).status_code == 201
    with engine.begin() as conn:
        conn.execute(text("UPDATE job_schedule SET next_fire_at = now() - interval '1 day'"))
    registry = typed_client.app.state.heimdex.registry  # type: ignore[attr-defined]
    with engine.begin() as conn:
        (fired,) = schedules.fire_due(conn, registry)
        (listed,) = schedules.list_schedules(conn, org)
    token = issue_token(SECRET, org_id=uuid.uuid4(), sub="op-bob", role=READONLY_ROLE)
    signed = typed_client.post("/ui/signin", data={"token": token}, follow_redirects=False)
    assert signed.status_code == 303
    page = typed_client.get("/ui/schedules")
    assert page.status_code == 200
    assert "hourly-&lt;b&gt;" in page.text and "<b>" not in page.text.split("hourly-")[1][:10]
    assert f"/ui/jobs/{fired.job_id}" in page.text and "queued" in page.text
    assert listed.next_fire_at.strftime("%Y-%m-%d %H:%M:%S") in page.text
