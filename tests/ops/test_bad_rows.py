"""Rows the API would refuse to write, put there with SQL (a restore, a hand edit, an older
version): timestamps Python cannot hold (after year 9999, before year 1, +/-infinity). Every
reader shows them, clamped to the nearest instant Python holds, and the rows around them; one
bad row takes down no list, for any reader."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner, Result
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from heimdex.cli import main
from heimdex_api.auth import ADMIN_ROLE, issue_token
from tests.ops import seed
from tests.stack import SECRET, auth

LATEST = datetime.max.replace(tzinfo=UTC)
EARLIEST = datetime.min.replace(tzinfo=UTC)
# (run_at, created_at, started_at, finished_at, status, event ts)
BAD = [
    # What `POST /jobs` stored for "9999-12-31T23:59:59-14:00": never due, so queued for ever.
    ("10000-01-01 13:59:59+00", "now()", None, None, "queued", "now()"),
    ("infinity", "10000-06-01 00:00:00+00", None, None, "queued", "10000-06-01 00:00:00+00"),
    ("-infinity", "-infinity", "0044-03-15 00:00:00+00 BC", "infinity", "dead_letter",
     "infinity"),
]  # fmt: skip


def _insert_bad_rows(engine: Engine, org: uuid.UUID) -> list[uuid.UUID]:
    ids = []
    with engine.begin() as conn:
        for run_at, created_at, started_at, finished_at, status, ts in BAD:
            job_id = uuid.uuid4()
            conn.execute(
                text(
                    "INSERT INTO job (id, org_id, type, status, run_at, created_at, updated_at,"
                    " started_at, finished_at, params)"
                    " VALUES (:id, :org, 'noop', CAST(:status AS job_status),"
                    f" {_ts(run_at)}, {_ts(created_at)}, {_ts(created_at)}, {_ts(started_at)},"
                    f" {_ts(finished_at)}, '{{}}')"
                ),
                {"id": job_id, "org": org, "status": status},
            )
            conn.execute(
                text(
                    "INSERT INTO job_event (job_id, ts, prev_status, next_status)"
                    f" VALUES (:id, {_ts(ts)}, NULL, 'queued')"
                ),
                {"id": job_id},
            )
            ids.append(job_id)
    return ids


def _ts(value: str | None) -> str:
    if value is None:
        return "NULL"
    return value if value == "now()" else f"'{value}'::timestamptz"


@pytest.fixture
def rows(engine: Engine, org_id: uuid.UUID) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """(the bad rows, good jobs of the same org)"""
    good = seed.queued(engine, org_id, 2)
    return _insert_bad_rows(engine, org_id), good


def test_the_orgs_api_reads_and_cancels_bad_rows(
    client: TestClient, org_id: uuid.UUID, rows: tuple[list[uuid.UUID], list[uuid.UUID]]
) -> None:
    bad, good = rows
    listed = client.get("/jobs", headers=auth(org_id))
    assert listed.status_code == 200, listed.text
    assert {j["id"] for j in listed.json()["items"]} == {str(i) for i in bad + good}
    newest = listed.json()["items"][0]
    assert newest["id"] == str(bad[1]) and newest["created_at"] == "9999-12-31T23:59:59.999999Z"
    # Pages continue past a clamped row.
    first = client.get("/jobs", params={"limit": 1}, headers=auth(org_id)).json()
    rest = client.get(
        "/jobs", params={"limit": 200, "cursor": first["next_cursor"]}, headers=auth(org_id)
    )
    assert rest.status_code == 200, rest.text
    assert len(rest.json()["items"]) == len(bad + good) - 1
    for job_id in bad:
        one = client.get(f"/jobs/{job_id}", headers=auth(org_id))
        assert one.status_code == 200, one.text
        assert client.get(f"/jobs/{job_id}/events", headers=auth(org_id)).status_code == 200
    assert client.get(f"/jobs/{bad[2]}", headers=auth(org_id)).json()["run_at"] == (
        "0001-01-01T00:00:00Z"
    )
    canceled = client.post(f"/jobs/{bad[0]}/cancel", headers=auth(org_id))
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled"
    assert canceled.json()["run_at"] == "9999-12-31T23:59:59.999999Z"


def test_operators_read_bad_rows_in_the_api_and_the_dashboard(
    client: TestClient, engine: Engine, rows: tuple[list[uuid.UUID], list[uuid.UUID]]
) -> None:
    bad, good = rows
    seed.failed(engine, uuid.uuid4())  # another org's job
    token = issue_token(SECRET, org_id=uuid.uuid4(), sub="op", role=ADMIN_ROLE)
    admin = {"Authorization": f"Bearer {token}"}
    listed = client.get("/ops/jobs", params={"limit": 200}, headers=admin)
    assert listed.status_code == 200, listed.text
    assert {str(i) for i in bad + good} <= {j["id"] for j in listed.json()["items"]}
    queued = client.get("/ops/jobs", params={"status": "queued"}, headers=admin)
    assert queued.status_code == 200, queued.text
    for job_id in bad:
        detail = client.get(f"/ops/jobs/{job_id}", headers=admin)
        assert detail.status_code == 200, detail.text
    assert client.get("/ops/stats", headers=admin).status_code == 200
    assert client.get("/ops/failures", headers=admin).status_code == 200
    canceled = client.post(f"/ops/jobs/{bad[1]}/cancel", json={}, headers=admin)
    assert canceled.status_code == 200, canceled.text

    signed_in = client.post(
        "/ui/signin",
        data={"token": token},
        follow_redirects=False,
    )
    assert signed_in.status_code == 303
    for path in ("/ui", "/ui/jobs", "/ui/jobs?status=queued", f"/ui/jobs/{bad[2]}"):
        page = client.get(path)
        assert page.status_code == 200, (path, page.text[-500:])
    page = client.get("/ui/jobs").text
    assert all(str(i)[:8] in page for i in bad + good)
    assert "9999-12-31 23:59:59" in client.get(f"/ui/jobs/{bad[2]}").text


def test_the_cli_lists_shows_and_cancels_bad_rows(
    db_url: URL,
    monkeypatch: pytest.MonkeyPatch,
    rows: tuple[list[uuid.UUID], list[uuid.UUID]],
) -> None:
    bad, good = rows
    monkeypatch.setenv("DATABASE_URL", db_url.render_as_string(hide_password=False))

    def run(*args: str) -> Result:
        return CliRunner().invoke(main, ["jobs", *args], catch_exceptions=False)

    listed = run("list", "--state", "queued")
    assert listed.exit_code == 0, listed.output
    assert {str(i) for i in [*bad[:2], *good]} <= set(re.findall(r"^\S{36}", listed.output, re.M))
    as_json = run("list", "--json", "--limit", "1000")
    assert as_json.exit_code == 0
    assert {str(i) for i in bad} <= {j["id"] for j in json.loads(as_json.output)}
    for job_id in bad:
        shown = run("show", str(job_id), "--json")
        assert shown.exit_code == 0, shown.output
    assert "9999-12-31" in run("show", str(bad[2])).output
    canceled = run("cancel", str(bad[0]), "--reason", "never due", "--yes")
    assert canceled.exit_code == 0, canceled.output
    assert "canceled" in canceled.output


def test_json_that_is_not_an_object_reads_as_one(
    client: TestClient, engine: Engine, org_id: uuid.UUID
) -> None:
    good = seed.queued(engine, org_id, 1)
    job_id = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO job (id, org_id, type, status, finished_at, params, result)"
                " VALUES (:id, :org, 'noop', 'succeeded', now(), '[1, 2]', '\"done\"')"
            ),
            {"id": job_id, "org": org_id},
        )
        conn.execute(
            text(
                "INSERT INTO job_event (job_id, prev_status, next_status, detail_json)"
                " VALUES (:id, NULL, 'queued', '[]')"
            ),
            {"id": job_id},
        )
    listed = client.get("/jobs", headers=auth(org_id))
    assert listed.status_code == 200, listed.text
    items = {item["id"]: item for item in listed.json()["items"]}
    assert set(map(str, good)) < set(items)
    assert items[str(job_id)]["params"] == {"value": [1, 2]}
    assert items[str(job_id)]["result"] == {"value": "done"}
    events = client.get(f"/jobs/{job_id}/events", headers=auth(org_id))
    assert events.status_code == 200, events.text
    assert events.json()["items"][0]["detail"] == {"value": []}
    token = issue_token(SECRET, org_id=uuid.uuid4(), sub="op", role=ADMIN_ROLE)
    admin = {"Authorization": f"Bearer {token}"}
    ops = client.get("/ops/jobs", headers=admin)
    assert ops.status_code == 200, ops.text
    assert str(job_id) in {item["id"] for item in ops.json()["items"]}
