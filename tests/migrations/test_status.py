"""`heimdex db status`: the exit codes a script can branch on."""

from __future__ import annotations

from sqlalchemy.engine import URL

from heimdex_db.context import DbContext
from heimdex_db.status import StatusCode, status
from tests.dbutil import execute

from .conftest import VERSION_TABLE, HistoryCopy, heimdex, revisions_of, url_arg


def test_empty_database_lists_pending_revisions_with_messages(empty_db_url: URL) -> None:
    proc = heimdex("db", "status", "--database-url", url_arg(empty_db_url))
    assert proc.returncode == StatusCode.PENDING == 3, proc.stderr
    assert "current: base" in proc.stdout
    assert "pending: 001_job_ledger_init  job ledger init" in proc.stdout
    assert "pending: 3af4686817cc  hardening: job ledger enums/indexes/idempotency" in proc.stdout
    pending = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("pending:")]
    assert pending == revisions_of()


def test_at_head_is_zero(db_url: URL) -> None:
    proc = heimdex("db", "status", "--database-url", url_arg(db_url))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "up to date" in proc.stdout


def test_partly_migrated_database_lists_only_what_is_left(db_url: URL) -> None:
    execute(db_url, f"UPDATE {VERSION_TABLE} SET version_num = '001_job_ledger_init'")
    result = status(DbContext.build(database_url=db_url))
    assert result.code is StatusCode.PENDING
    assert [p.revision for p in result.pending] == revisions_of()[1:]


def test_models_drifting_from_the_database_is_four(db_url: URL) -> None:
    execute(db_url, "ALTER TABLE job ADD COLUMN sneaked_in integer")
    proc = heimdex("db", "status", "--database-url", url_arg(db_url))
    assert proc.returncode == StatusCode.DRIFT == 4
    assert "drift:   remove_column" in proc.stdout
    assert "sneaked_in" in proc.stdout


def test_multiple_heads_is_five(history: HistoryCopy, db_url: URL) -> None:
    head = history.head
    history.add_revision("aaaa00000001", head, "pass")
    history.add_revision("bbbb00000002", head, "pass")
    proc = heimdex("db", "status", "-c", history.ini, "--database-url", url_arg(db_url))
    assert proc.returncode == StatusCode.MULTIPLE_HEADS == 5
    assert "multiple heads" in proc.stdout


def test_database_at_an_unknown_revision_is_six(db_url: URL) -> None:
    execute(db_url, f"UPDATE {VERSION_TABLE} SET version_num = 'feedface0000'")
    proc = heimdex("db", "status", "--database-url", url_arg(db_url))
    assert proc.returncode == StatusCode.UNKNOWN_REVISION == 6
    assert "unknown revision in the database: feedface0000" in proc.stdout


def test_unreachable_database_is_one_line_and_exit_one() -> None:
    proc = heimdex("db", "status", "--database-url", "postgresql://u:s3cret@127.0.0.1:1/ledger")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: cannot connect to PostgreSQL at 127.0.0.1:1")
    assert "Traceback" not in proc.stderr
    assert "s3cret" not in proc.stderr
