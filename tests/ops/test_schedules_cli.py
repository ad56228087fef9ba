"""`heimdex schedules` through click's runner against the test database."""

from __future__ import annotations

import json
import uuid
from datetime import datetime

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from heimdex.cli import main

TYPES = "tests.worker.schedule_types:jobs"


@pytest.fixture
def run(db_url: URL, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DATABASE_URL", db_url.render_as_string(hide_password=False))
    monkeypatch.setenv("HEIMDEX_JOB_MODULES", TYPES)

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(main, ["schedules", *args], catch_exceptions=False)

    return invoke


def _rows(engine: Engine) -> list[tuple[str, bool]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT name, paused FROM job_schedule"))]


def test_add_list_pause_resume_remove(run, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    org = str(uuid.uuid4())
    added = run(
        "add", "--org", org, "reports", "--type", "minutely", "--cron", "*/5 * * * *",
        "--params", '{"label": "five"}',
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    assert "next fire" in added.output
    listed = json.loads(run("list", "--json").output)
    assert [(s["org_id"], s["name"], s["cron"], s["paused"]) for s in listed] == [
        (org, "reports", "*/5 * * * *", False)
    ]
    assert listed[0]["params"] == {"label": "five"} and listed[0]["last_job_id"] is None
    next_fire = datetime.fromisoformat(listed[0]["next_fire_at"])
    assert next_fire.minute % 5 == 0 and next_fire.second == 0
    table = run("list", "--org", org).output.splitlines()
    assert table[0].split()[:4] == ["ORG", "NAME", "TYPE", "CRON"]
    assert "reports" in table[1] and "active" in table[1]
    assert run("pause", "--org", org, "reports").exit_code == 0
    assert _rows(engine) == [("reports", True)]
    assert run("resume", "--org", org, "reports").exit_code == 0
    assert _rows(engine) == [("reports", False)]
    assert run("remove", "--org", org, "reports").exit_code == 0
    assert _rows(engine) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--type", "minutely", "--cron", "every day"], "not a cron expression"),
        (["--type", "nope", "--cron", "* * * * *"], "nope"),
        (["--type", "minutely", "--cron", "* * * * *", "--params", '{"label": 3}'], "label"),
        (["--type", "minutely", "--cron", "* * * * *", "--params", "[1]"], "JSON object"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(  # type: ignore[no-untyped-def]
    run, engine: Engine, args: list[str], message: str
) -> None:
    result = run("add", "--org", str(uuid.uuid4()), "bad", *args)
    assert result.exit_code != 0
    assert message in result.output
    assert _rows(engine) == []


def test_unknown_and_duplicate_schedules_are_refused(run, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    org = str(uuid.uuid4())
    for verb in ("pause", "resume", "remove"):
        missing = run(verb, "--org", org, "ghost")
        assert missing.exit_code == 1 and "has no schedule 'ghost'" in missing.output
    assert run("add", "--org", org, "s", "--type", "minutely", "--cron", "0 * * * *").exit_code == 0
    again = run("add", "--org", org, "s", "--type", "minutely", "--cron", "5 * * * *")
    assert again.exit_code == 1 and "already has a schedule 's'" in again.output
    assert run("list", "--org", "x").exit_code == 2
