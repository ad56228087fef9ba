"""`heimdex db verify`: the whole history, in a throwaway database, on seeded rows."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from heimdex_db.config import alembic_config
from heimdex_db.context import DbContext
from heimdex_db.supabase.artifacts import sql
from heimdex_db.verify.command import VerifyFailed, verify

from .conftest import HistoryCopy, clean_env, heimdex, revisions_of, url_arg

pytestmark = pytest.mark.slow  # clusters of its own, every revision up/down/up

LOCK = "op.execute(\"SET LOCAL lock_timeout = '5s'\")"


def _databases(admin_engine: Engine) -> set[str]:
    with admin_engine.connect() as conn:
        return set(conn.execute(text("SELECT datname FROM pg_database")).scalars())


def test_verify_passes_on_a_server_and_leaves_no_database_behind(
    pg_admin_url: URL, admin_engine: Engine
) -> None:
    before = _databases(admin_engine)
    # The configured database does not exist: verify must never need (or touch) it.
    env = clean_env(DATABASE_URL="postgresql://nobody@127.0.0.1:1/dev_database")
    proc = heimdex("db", "verify", "--database-url", url_arg(pg_admin_url), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rev in revisions_of():
        assert f"ok: {rev} up/down/up with seeded rows" in proc.stdout
    assert "ok: models match the database at head" in proc.stdout
    assert "ok: Supabase artifacts in" in proc.stdout
    assert _databases(admin_engine) == before


def test_verify_without_a_url_starts_its_own_cluster() -> None:
    proc = heimdex("db", "verify", env=clean_env(DATABASE_URL="postgresql://x@127.0.0.1:1/no"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "starting a throwaway PostgreSQL cluster" in proc.stderr


def test_a_downgrade_that_leaves_something_behind_is_named_with_the_diff(
    history: HistoryCopy, pg_admin_url: URL
) -> None:
    history.add_revision(
        "leaky0000001",
        history.head,
        f"""
        {LOCK}
        op.execute("CREATE TYPE job_region AS ENUM ('eu', 'us')")
        op.add_column("job", sa.Column("region", sa.Text()))
        """,
        f"""
        {LOCK}
        op.drop_column("job", "region")
        """,
    )
    with pytest.raises(VerifyFailed) as info:
        verify(DbContext.build(history.ini), check_artifacts=False, server_url=pg_admin_url)
    message = str(info.value)
    assert message.startswith("downgrade of leaky0000001 does not restore the schema before it")
    assert "+enums: job_region ('eu,us',)" in message


def test_a_downgrade_that_forgets_a_table_is_named(history: HistoryCopy, pg_admin_url: URL) -> None:
    history.add_revision(
        "reup00000001",
        history.head,
        f"""
        {LOCK}
        op.execute("CREATE TABLE IF NOT EXISTS job_note (id int)")
        op.execute("CREATE INDEX idx_job_note__id ON job_note (id)")
        """,
        f"""
        {LOCK}
        op.execute("DROP INDEX idx_job_note__id")
        """,
    )
    with pytest.raises(VerifyFailed) as info:
        verify(DbContext.build(history.ini), check_artifacts=False, server_url=pg_admin_url)
    assert "reup00000001" in str(info.value)


def test_a_data_migration_that_breaks_on_legacy_rows_is_caught(
    history: HistoryCopy, pg_admin_url: URL, empty_db_url: URL
) -> None:
    """Upstream's failure: fine on empty tables, broken on the rows production holds."""
    head = history.head
    history.add_revision(
        "backf0000001",
        head,
        f"""
        {LOCK}
        # Backfill requested_by for jobs created through the API, then require it.
        op.execute("UPDATE job SET requested_by = 'api' WHERE type <> 'legacy'")
        op.alter_column("job", "requested_by", nullable=False)
        """,
        f"""
        {LOCK}
        op.alter_column("job", "requested_by", nullable=True)
        """,
    )
    # The plain stairway on empty tables passes...
    cfg = alembic_config(history.ini, database_url=empty_db_url)
    command.upgrade(cfg, "head")
    command.downgrade(cfg, head)
    command.upgrade(cfg, "head")
    # ...verify, with the legacy rows 001 imported, does not.
    with pytest.raises(VerifyFailed) as info:
        verify(DbContext.build(history.ini), check_artifacts=False, server_url=pg_admin_url)
    message = str(info.value)
    assert message.startswith("upgrade to backf0000001 failed on seeded rows")
    assert 'column "requested_by" of relation "job" contains null values' in message


def test_stale_artifacts_fail_verify(
    history: HistoryCopy, pg_admin_url: URL, tmp_path: Path
) -> None:
    out = tmp_path / "migrations"
    sql(DbContext.build(history.ini), output_dir=out)
    (out / "0001_job_ledger_init.sql").write_text("-- edited by hand\n")
    with pytest.raises(VerifyFailed, match=r"0001_job_ledger_init.sql: stale"):
        verify(DbContext.build(history.ini), artifacts_dir=out, server_url=pg_admin_url)
