"""`heimdex db revision`: refuses a database behind head, writes formatted files, enums right."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from heimdex.errors import HeimdexError
from heimdex_db.context import DbContext
from heimdex_db.migrate import downgrade, upgrade
from heimdex_db.revision import revision
from heimdex_db.status import StatusCode, status
from tests.dbutil import execute

from .conftest import VERSION_TABLE, HistoryCopy, heimdex, url_arg


@pytest.mark.slow
def test_autogenerate_refuses_a_database_that_is_not_at_head(
    history: HistoryCopy, db_url: URL
) -> None:
    execute(db_url, f"UPDATE {VERSION_TABLE} SET version_num = '001_job_ledger_init'")
    before = sorted(p.name for p in history.versions.iterdir())
    proc = heimdex(
        "db", "revision", "-m", "x", "--autogenerate", "-c", history.ini,
        "--database-url", url_arg(db_url),
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"the database is at 001_job_ledger_init, not at head {history.head}" in proc.stderr
    assert "heimdex db upgrade" in proc.stderr
    assert sorted(p.name for p in history.versions.iterdir()) == before


@pytest.mark.slow
def test_a_plain_revision_is_formatted_and_follows_head(history: HistoryCopy) -> None:
    head = history.head
    path = revision(DbContext.build(history.ini), "add job region", rev_id="aa11bb22cc33")
    assert path == history.versions / "aa11bb22cc33_add_job_region.py"
    text = path.read_text()
    assert f'down_revision = "{head}"' in text
    assert "from heimdex_db.online import set_lock_timeout" in text
    assert "def upgrade() -> None:\n    set_lock_timeout()" in text
    check = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout


def test_varchar_to_enum_autogenerates_create_type_and_using_and_applies(
    history: HistoryCopy, db_url: URL
) -> None:
    head = history.head
    # The database holds backoff_policy as VARCHAR and has no enum type: the models say enum.
    execute(
        db_url,
        "ALTER TABLE job ALTER COLUMN backoff_policy DROP DEFAULT",
        "ALTER TABLE job ALTER COLUMN backoff_policy TYPE varchar(16) USING backoff_policy::text",
        "ALTER TABLE job ALTER COLUMN backoff_policy SET DEFAULT 'exp'",
        "DROP TYPE job_backoff_policy",
        "INSERT INTO job (org_id, type, backoff_policy) VALUES (gen_random_uuid(), 't', 'fixed')",
    )
    # One context for the whole session: the revision written is in its history afterwards.
    ctx = DbContext.build(history.ini, database_url=db_url)
    path = revision(ctx, "backoff policy as enum", autogenerate=True, rev_id="e0e0e0e0e0e0")
    text = path.read_text()
    assert 'postgresql_using="backoff_policy::job_backoff_policy"' in text or (
        "postgresql_using='backoff_policy::job_backoff_policy'" in text
    )
    assert 'name="job_backoff_policy"' in text
    assert ".create(op.get_bind())" in text
    assert ".drop(op.get_bind())" in text  # the downgrade drops the type it created
    # It applies on the row holding 'fixed', and the models then match the database.
    upgrade(ctx)
    result = status(ctx)
    assert result.code is StatusCode.AT_HEAD, result
    # And the generated downgrade works too (enum -> VARCHAR around the default as well).
    downgrade(ctx, head)
    upgrade(ctx)


def test_output_dir_receives_the_file_and_the_history_stays_untouched(
    history: HistoryCopy, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "nested"
    before = sorted(p.name for p in history.versions.iterdir())
    path = revision(
        DbContext.build(history.ini), "elsewhere", rev_id="ff00ff00ff00", output_dir=out
    )
    assert path.parent == out
    assert sorted(p.name for p in history.versions.iterdir()) == before


def test_an_empty_message_is_refused(history: HistoryCopy) -> None:
    with pytest.raises(HeimdexError, match="-m/--message"):
        revision(DbContext.build(history.ini), "  ")


@pytest.mark.slow
def test_a_new_index_on_an_existing_table_is_generated_concurrent_and_applies(
    history: HistoryCopy, db_url: URL
) -> None:
    execute(db_url, "DROP INDEX idx_job__status_created_at")
    ctx = DbContext.build(history.ini, database_url=db_url)
    path = revision(ctx, "status index back", autogenerate=True, rev_id="c0c0c0c0c0c0")
    text = path.read_text()
    upgrade_body = text.split("def upgrade() -> None:")[1].split("def downgrade()")[0]
    assert "with op.get_context().autocommit_block():" in upgrade_body
    assert "postgresql_concurrently=True" in upgrade_body
    upgrade(ctx)
    result = status(ctx)
    assert result.code is StatusCode.AT_HEAD, result
    compiled = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(history.ini), "upgrade",
         f"{history.revisions[-2]}:c0c0c0c0c0c0", "--sql"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    # Outside the revision's transaction: COMMIT before the build, BEGIN after it.
    assert "COMMIT;\n\nCREATE INDEX CONCURRENTLY idx_job__status_created_at" in compiled
