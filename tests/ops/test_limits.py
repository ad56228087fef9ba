"""Caps, weights and pauses through `/ops` and through `heimdex limits|pause|resume`: changes
are audited (actor, reason); bad input is a 4xx problem or one line and exit 1, and changes
nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import pytest
from click.testing import CliRunner, Result
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from heimdex.cli import main
from heimdex.ledger import repository
from heimdex.ledger.repository import NewJob
from heimdex_api.auth import ADMIN_ROLE, READONLY_ROLE, issue_token
from tests.ops.test_api import PROBLEM, as_role
from tests.stack import SECRET, auth

ADMIN = as_role(ADMIN_ROLE)
READONLY = as_role(READONLY_ROLE, "op-bob")
TABLES = ("job_limit", "job_pause", "job_control_event")


def _counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}


def test_set_list_unset_pause_resume_through_ops(client: TestClient, engine: Engine) -> None:
    org = str(uuid.uuid4())
    put = client.put(
        "/ops/limits", json={"org_id": org, "max_running": 2, "reason": "plan"}, headers=ADMIN
    )
    assert put.status_code == 200, put.text
    assert put.json()["max_running"] == 2 and put.json()["used"] == 0
    weight = client.put(
        "/ops/limits", json={"org_id": org, "weight": 3, "reason": "pro"}, headers=ADMIN
    )
    assert weight.json()["weight"] == 3 and weight.json()["max_running"] == 2
    paused = client.post("/ops/pause", json={"queue": "gpu", "reason": "driver"}, headers=ADMIN)
    assert paused.status_code == 201, paused.text
    assert paused.json()["held"] == 0 and paused.json()["kind"] == "queue"
    again = client.post("/ops/pause", json={"queue": "gpu", "reason": "driver"}, headers=ADMIN)
    assert again.status_code == 409 and again.headers["content-type"] == PROBLEM
    state = client.get("/ops/limits", headers=READONLY).json()
    assert [(x["org_id"], x["max_running"], x["weight"]) for x in state["limits"]] == [(org, 2, 3)]
    assert [(p["kind"], p["value"]) for p in state["pauses"]] == [("queue", "gpu")]
    resumed = client.post("/ops/resume", json={"queue": "gpu", "reason": "ok"}, headers=ADMIN)
    assert resumed.status_code == 200, resumed.text
    unset = client.post("/ops/limits/unset", json={"org_id": org, "reason": "end"}, headers=ADMIN)
    assert unset.status_code == 200 and unset.json()["max_running"] == 2
    events = client.get("/ops/control-events", headers=READONLY).json()["items"]
    assert [(e["action"], e["actor"]) for e in reversed(events)] == [
        ("limit_set", "op-alice"),
        ("limit_set", "op-alice"),
        ("paused", "op-alice"),
        ("resumed", "op-alice"),
        ("limit_unset", "op-alice"),
    ]
    assert _counts(engine)["job_limit"] == 0


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("put", "/ops/limits", {"org_id": "acme", "max_running": 2, "reason": "x"}, 422),
        (
            "put",
            "/ops/limits",
            {"org_id": str(uuid.uuid4()), "max_running": -1, "reason": "x"},
            422,
        ),
        ("put", "/ops/limits", {"max_running": 2, "reason": "x"}, 422),  # no scope
        ("put", "/ops/limits", {"queue": "gpu", "weight": 2, "reason": "x"}, 422),  # weight: org
        ("put", "/ops/limits", {"org_id": str(uuid.uuid4()), "reason": "x"}, 422),  # nothing
        ("put", "/ops/limits", {"org_id": str(uuid.uuid4()), "max_running": 2}, 422),  # reason
        ("put", "/ops/limits", {"queue": "g p u", "max_running": 2, "reason": "x"}, 422),
        ("post", "/ops/limits/unset", {"org_id": str(uuid.uuid4()), "reason": "x"}, 404),
        ("post", "/ops/pause", {"queue": "gpu", "type": "t", "reason": "x"}, 422),
        ("post", "/ops/pause", {"reason": "x"}, 422),
        ("post", "/ops/resume", {"queue": "gpu", "reason": "x"}, 404),
    ],
)
def test_bad_input_is_a_problem_and_changes_nothing(  # noqa: PLR0917 - parametrized
    client: TestClient, engine: Engine, method: str, path: str, body: dict[str, object],
    status: int,
) -> None:  # fmt: skip
    resp = client.request(method, path, json=body, headers=ADMIN)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == PROBLEM
    assert _counts(engine) == dict.fromkeys(TABLES, 0)


def test_changes_need_the_admin_role(client: TestClient, engine: Engine) -> None:
    body = {"org_id": str(uuid.uuid4()), "max_running": 2, "reason": "x"}
    assert client.put("/ops/limits", json=body, headers=READONLY).status_code == 403
    assert _counts(engine) == dict.fromkeys(TABLES, 0)


@pytest.fixture
def run(db_url: URL, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    monkeypatch.setenv("DATABASE_URL", db_url.render_as_string(hide_password=False))
    monkeypatch.setenv("USER", "op-carol")

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(main, list(args))

    return invoke


def test_the_cli_sets_lists_pauses_and_resumes(run: Callable[..., Result], engine: Engine) -> None:
    org = str(uuid.uuid4())
    done = run("limits", "set", "--org", org, "--queue", "gpu", "--max-running", "2",
               "--reason", "gpu share")  # fmt: skip
    assert done.exit_code == 0, done.output
    listed = json.loads(run("limits", "list", "--json").output)
    assert [(x["org_id"], x["queue"], x["max_running"]) for x in listed["limits"]] == [
        (org, "gpu", 2)
    ]
    assert run("pause", "--org", org, "--reason", "billing").exit_code == 0
    assert "paused org" in run("limits", "list").output
    assert run("resume", "--org", org, "--reason", "paid").exit_code == 0
    assert run("limits", "unset", "--org", org, "--queue", "gpu", "--reason", "x").exit_code == 0
    with engine.connect() as conn:
        actors = conn.execute(text("SELECT DISTINCT actor FROM job_control_event")).scalars()
        assert list(actors) == ["op-carol"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("limits", "set", "--org", "acme", "--max-running", "2", "--reason", "x"), "not an org"),
        (
            ("limits", "set", "--org", str(uuid.uuid4()), "--max-running", "-3", "--reason", "x"),
            "--max-running must be",
        ),
        (
            ("limits", "set", "--org", str(uuid.uuid4()), "--max-running", "two", "--reason", "x"),
            "not a valid integer",
        ),
        (("limits", "set", "--max-running", "2", "--reason", "x"), "name an org"),
        (("limits", "unset", "--org", str(uuid.uuid4()), "--reason", "x"), "no cap or weight"),
        (("pause", "--org", "acme", "--reason", "x"), "not a UUID"),
        (("pause", "--queue", "gpu", "--type", "t", "--reason", "x"), "exactly one"),
        (("resume", "--queue", "gpu", "--reason", "x"), "not paused"),
    ],
)
def test_cli_bad_input_is_one_line_and_changes_nothing(
    run: Callable[..., Result], engine: Engine, args: tuple[str, ...], message: str
) -> None:
    result = run(*args)
    assert result.exit_code != 0
    assert message in result.output
    errors = [line for line in result.output.splitlines() if "rror" in line]
    assert len(errors) == 1, result.output
    assert _counts(engine) == dict.fromkeys(TABLES, 0)


def _two_queues(engine: Engine) -> tuple[uuid.UUID, set[uuid.UUID], set[uuid.UUID]]:
    org = uuid.uuid4()
    with engine.begin() as conn:
        gpu = repository.insert_jobs(
            conn, [NewJob(org, "noop", {}, None, queue="gpu") for _ in range(2)]
        )
        cpu = repository.insert_jobs(conn, [NewJob(org, "noop", {}, None) for _ in range(3)])
    return org, {j.id for j in gpu}, {j.id for j in cpu}


def test_the_queue_is_shown_and_filtered_in_api_cli_and_dashboard(
    client: TestClient, engine: Engine, run: Callable[..., Result]
) -> None:
    org, gpu, cpu = _two_queues(engine)
    own = client.get("/jobs", params={"queue": "gpu"}, headers=auth(org)).json()["items"]
    assert {uuid.UUID(j["id"]) for j in own} == gpu and {j["queue"] for j in own} == {"gpu"}
    ops = client.get("/ops/jobs", params={"queue": "default"}, headers=READONLY).json()
    assert {uuid.UUID(j["id"]) for j in ops["items"]} == cpu
    listed = json.loads(run("jobs", "list", "--queue", "gpu", "--json").output)
    assert {uuid.UUID(j["id"]) for j in listed} == gpu
    assert "QUEUE" in run("jobs", "list").output
    token = issue_token(SECRET, org_id=uuid.uuid4(), sub="op-bob", role=READONLY_ROLE)
    client.post("/ui/signin", data={"token": token}, follow_redirects=False)
    page = client.get("/ui/jobs", params={"queue": "gpu"}).text
    assert all(str(i)[:8] in page for i in gpu) and not any(str(i)[:8] in page for i in cpu)
