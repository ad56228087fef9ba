"""`heimdex jobs` through click's runner against the test database."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from heimdex.cli import main
from heimdex.ledger import repository
from heimdex.models import JobStatus
from tests.ops import seed


@pytest.fixture
def run(db_url: URL, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DATABASE_URL", db_url.render_as_string(hide_password=False))
    monkeypatch.setenv("USER", "carol")

    def invoke(*args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(main, ["jobs", *args], input=input, catch_exceptions=False)

    return invoke


def _status(engine: Engine, job_id: uuid.UUID) -> JobStatus:
    with engine.connect() as conn:
        return repository.get_job(conn, job_id).status  # type: ignore[no-any-return]


def test_list_filters_and_json(run, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    org = uuid.uuid4()
    dead = seed.failed(engine, org, 2)
    seed.queued(engine, uuid.uuid4(), 1)
    table = run("list", "--status", "dead_letter")
    assert table.exit_code == 0
    lines = table.output.splitlines()
    assert lines[0].split() == [
        "ID", "STATUS", "TYPE", "QUEUE", "ORG", "ATTEMPT", "CREATED", "ERROR",
    ]  # fmt: skip
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(map(str, dead))
    assert all("UPSTREAM_TIMEOUT" in line for line in lines[1:])
    as_json = json.loads(run("list", "--org", str(org), "--json").output)
    assert {j["id"] for j in as_json} == set(map(str, dead))
    assert as_json[0]["error_fingerprint"] and as_json[0]["org_id"] == str(org)
    assert json.loads(run("list", "--org", str(uuid.uuid4()), "--json").output) == []
    bad = run("list", "--org", "nope")
    assert bad.exit_code == 2 and "'nope' is not a UUID" in bad.output


def test_show_prints_the_job_and_its_events(run, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = seed.failed(engine, uuid.uuid4())
    shown = run("show", str(job_id))
    assert shown.exit_code == 0
    assert "dead_letter" in shown.output and "UPSTREAM_TIMEOUT" in shown.output
    assert "attempt_failed" in shown.output and "submitted" in shown.output
    data = json.loads(run("show", str(job_id), "--json").output)
    assert [e["to"] for e in data["events"]] == ["queued", "running", "dead_letter"]
    missing = run("show", str(uuid.uuid4()))
    assert missing.exit_code == 1 and "not found" in missing.output


def test_retry_one_job_needs_a_reason_and_records_the_actor(run, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = seed.failed(engine, uuid.uuid4())
    refused = run("retry", str(job_id))
    assert refused.exit_code == 2 and "--reason" in refused.output
    assert (
        run("retry", str(job_id), "--reason", "x", "--dry-run").output == "1 job would be retried\n"
    )
    done = run("retry", str(job_id), "--reason", "bucket fixed")
    assert (done.exit_code, done.output) == (0, f"{job_id}: queued\n")
    with engine.connect() as conn:
        detail = repository.list_events(conn, job_id)[-1].detail_json
    assert detail["actor"] == "carol" and detail["reason"] == "bucket fixed"
    again = run("retry", str(job_id), "--reason", "again", "--actor", "dave")
    assert again.exit_code == 1 and "queued; retry applies to dead_letter" in again.output


def test_a_dry_run_needs_no_reason_and_the_retry_itself_does(run, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    org = uuid.uuid4()
    (job_id,) = seed.failed(engine, org)
    (fp,) = [g["fingerprint"] for g in json.loads(run("failures", "--json").output)]
    for args in (("--fingerprint", fp), (str(job_id),)):
        dry = run("retry", *args, "--dry-run")
        assert (dry.exit_code, dry.output) == (0, "1 job would be retried\n")
        refused = run("retry", *args, "--yes")
        assert refused.exit_code == 2
        assert "Missing option '--reason'" in refused.stderr
        assert "--dry-run" in refused.stderr
    assert run("cancel", "--org", str(org), "--dry-run").output == "0 jobs would be canceled\n"
    assert run("requeue", "--org", str(org), "--dry-run").output == "0 jobs would be requeued\n"
    assert _status(engine, job_id) == JobStatus.DEAD_LETTER


def test_bulk_retry_by_filter_dry_run_confirmation_and_yes(run, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    org = uuid.uuid4()
    timeouts = seed.failed(engine, org, 5)
    seed.failed(engine, org, 2, code="BAD_INPUT", message="empty")
    (fp,) = [
        g["fingerprint"]
        for g in json.loads(run("failures", "--json").output)
        if g["error_code"] == "UPSTREAM_TIMEOUT"
    ]
    args = ("retry", "--fingerprint", fp, "--reason", "upstream back")
    assert run(*args, "--dry-run").output == "5 jobs would be retried\n"
    declined = run(*args, input="n\n")
    assert declined.exit_code == 1 and "Retry 5 jobs?" in declined.output
    assert {_status(engine, j) for j in timeouts} == {JobStatus.DEAD_LETTER}
    done = run(*args, "--yes", "--batch-size", "2")
    assert (done.exit_code, done.output) == (0, "retried 5 jobs in 3 batches\n")
    assert {_status(engine, j) for j in timeouts} == {JobStatus.QUEUED}
    assert run(*args, "--yes").output == "no job to retry\n"
    nothing = run("cancel", "--yes")
    assert nothing.exit_code == 1 and "needs job ids or at least one filter" in nothing.output


def test_cancel_and_requeue_by_ids(run, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    later = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    a, b, c = seed.queued(engine, uuid.uuid4(), 3, run_at=later)
    assert run("requeue", str(a), str(b), input="y\n").output.endswith(
        "requeued 2 jobs in 1 batches\n"
    )
    out = run("cancel", str(c), "--reason", "duplicate")
    assert out.output == f"{c}: canceled\n"
    assert [_status(engine, j) for j in (a, b, c)] == [
        JobStatus.QUEUED, JobStatus.QUEUED, JobStatus.CANCELED,
    ]  # fmt: skip


def test_stats_and_failures(run, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    org = uuid.uuid4()
    seed.failed(engine, org, 3)
    seed.queued(engine, org, 2)
    out = run("stats", "--minutes", "5")
    assert out.exit_code == 0
    assert "dead_letter  3" in out.output and "queued       2" in out.output
    assert "oldest due job:" in out.output and "last 5 min: 0 succeeded, 3 failed" in out.output
    data = json.loads(run("stats", "--org", str(org), "--json").output)
    assert data["by_org"] == {str(org): {"dead_letter": 3, "queued": 2}}
    assert data["failed"] == 3 and len(data["per_minute"]) == 15
    table = run("failures").output.splitlines()
    assert table[0].split()[:3] == ["JOBS", "CODE", "FINGERPRINT"]
    assert table[1].split()[:2] == ["3", "UPSTREAM_TIMEOUT"]
    assert run("failures", "--status", "failed").output == "no failures\n"


def test_status_is_the_one_word_and_state_a_hidden_alias(run, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    org = uuid.uuid4()
    dead = seed.failed(engine, org, 2)
    seed.queued(engine, org, 1)
    listed = {
        flag: {j["id"] for j in json.loads(run("list", flag, "dead_letter", "--json").output)}
        for flag in ("--status", "--state")
    }
    assert listed["--status"] == listed["--state"] == set(map(str, dead))
    assert run("failures", "--state", "failed").output == "no failures\n"
    dry = run("retry", "--state", "dead_letter", "--org", str(org), "--dry-run")
    assert dry.output == "2 jobs would be retried\n"
    for command in ("list", "failures", "retry", "cancel", "requeue"):
        shown = run(command, "--help").output
        assert "--status" in shown and "--state" not in shown, shown
    assert "--state" not in run("--help").output
    bad = run("list", "--status", "done")
    assert bad.exit_code == 2 and "'done' is not one of" in bad.output
