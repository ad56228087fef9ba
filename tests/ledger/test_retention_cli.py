"""`heimdex jobs prune`: dry run, a real run, and bad input changing nothing."""

from __future__ import annotations

import uuid

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from heimdex.ledger import retention
from heimdex.ledger.retention_cli import prune as prune_command
from heimdex.models import JobStatus
from tests.ledger.test_retention import _ids, _job


def test_the_cli_dry_run_and_prune(
    engine: Engine, db_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        _job(conn, org, JobStatus.SUCCEEDED, 3, events=2)
        _job(conn, org, JobStatus.FAILED, 3, events=1)
    monkeypatch.setenv("DATABASE_URL", db_url.render_as_string(hide_password=False))
    dry = CliRunner().invoke(prune_command, ["--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "succeeded older than 2w" in dry.output
    dry = CliRunner().invoke(prune_command, ["--dry-run", "--older-than", "2d"])
    assert dry.exit_code == 0, dry.output
    assert dry.output.splitlines()[-1].split() == ["total", "2", "3"]
    assert len(_ids(engine)) == 2
    bad = CliRunner().invoke(prune_command, ["--older-than", "soon"])
    assert bad.exit_code != 0
    assert len(_ids(engine)) == 2
    done = CliRunner().invoke(
        prune_command, ["--older-than", "2d", "--batch-size", "1", "--pause-factor", "0.5"]
    )
    assert done.exit_code == 0, done.output
    assert "total" in done.output
    assert "2 batches" in done.output and "paused" in done.output
    assert _ids(engine) == set()


def test_the_cli_refuses_while_another_pass_holds_the_lock(
    engine: Engine, db_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        _job(conn, org, JobStatus.SUCCEEDED, 30)
    monkeypatch.setenv("DATABASE_URL", db_url.render_as_string(hide_password=False))
    with engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": retention.ADVISORY_LOCK_KEY})
        holder.commit()
        refused = CliRunner().invoke(prune_command, [])
        assert refused.exit_code == 1
        assert "another retention pass holds the lock" in str(refused.exception)
        assert len(_ids(engine)) == 1
        holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": retention.ADVISORY_LOCK_KEY})
        holder.commit()


def test_prune_is_a_command_of_heimdex_jobs_and_takes_the_groups_database_url(
    engine: Engine, db_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    from heimdex.ledger.cli import jobs

    org = uuid.uuid4()
    with engine.begin() as conn:
        _job(conn, org, JobStatus.SUCCEEDED, 3)
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/nothing")
    url = db_url.render_as_string(hide_password=False)
    done = CliRunner().invoke(jobs, ["--database-url", url, "prune", "--older-than", "2d"])
    assert done.exit_code == 0, done.output
    assert _ids(engine) == set()
