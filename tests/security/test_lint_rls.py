"""`table-without-rls` on real offline SQL, from the history and from a temporary revision."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from heimdex_db.config import alembic_config, script_directory
from heimdex_db.lint.findings import Finding
from heimdex_db.lint.rls import RLS_BASELINE_REVISION, RULE, check_rls
from tests.inprocess import alembic
from tests.security.conftest import COMMON, offline_sql

NEW_REVISION = """\
\"\"\"new tables, some without RLS

Revision ID: 9f0000000001
Revises: {head}
\"\"\"

import sqlalchemy as sa
from alembic import op

revision = "9f0000000001"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("widget", sa.Column("id", sa.Integer, primary_key=True))
    op.create_table("gadget", sa.Column("id", sa.Integer, primary_key=True))
    op.execute("ALTER TABLE gadget ENABLE ROW LEVEL SECURITY")
    op.create_table(
        "audit", sa.Column("id", sa.Integer, primary_key=True), schema="heimdex_private"
    )
    op.execute('CREATE TABLE public."Odd Name" (id int)')
    op.execute('ALTER TABLE ONLY public."Odd Name" ENABLE ROW LEVEL SECURITY')
    op.execute("CREATE TEMP TABLE scratch (id int)")
    op.execute("CREATE TABLE staging (id int)")
    op.execute("DROP TABLE staging")
    op.execute("COMMENT ON TABLE gadget IS 'not a CREATE TABLE sneaky (id int)'")
    op.execute("CREATE TABLE IF NOT EXISTS public.sprocket (id int)")


def downgrade() -> None:
    pass
"""


def _alembic_sql(ini: Path, span: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    env.update(PGHOST="nowhere.invalid", PGPORT="1")
    proc = alembic("-c", str(ini), "upgrade", span, "--sql", cwd=ini.parent, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


@pytest.mark.slow
def test_a_later_revision_creating_tables_without_rls_is_flagged(tmp_path: Path) -> None:
    shutil.copytree(COMMON / "alembic", tmp_path / "alembic")
    shutil.copy(COMMON / "alembic.ini", tmp_path / "alembic.ini")
    head = script_directory(alembic_config()).get_current_head()
    (tmp_path / "alembic" / "versions" / "9f0000000001_new_tables.py").write_text(
        NEW_REVISION.format(head=head)
    )
    sql = _alembic_sql(tmp_path / "alembic.ini", f"{head}:9f0000000001")

    findings = check_rls(sql, filename="0009_new_tables.sql")

    lines = sql.splitlines()
    assert [(f.rule, f.path) for f in findings] == [(RULE, Path("0009_new_tables.sql"))] * 2
    assert [lines[f.line - 1] for f in findings] == [
        "CREATE TABLE widget (",
        "CREATE TABLE IF NOT EXISTS public.sprocket (id int);",
    ]
    assert "public.widget" in findings[0].message
    assert findings[0].render().startswith(f"0009_new_tables.sql:{findings[0].line} {RULE} ")


@pytest.mark.slow
def test_the_history_passes_from_the_baseline_on_and_would_have_failed_before() -> None:
    scripts = script_directory(alembic_config())
    order = list(reversed(list(scripts.walk_revisions())))
    baseline = [rev.revision for rev in order].index(RLS_BASELINE_REVISION)
    for rev in order[baseline:]:
        sql = offline_sql(rev.down_revision, rev.revision)  # type: ignore[arg-type]
        assert check_rls(sql, filename=rev.revision) == [], rev.revision
    first = offline_sql(None, "001_job_ledger_init")
    flagged = {f.message.split()[1] for f in check_rls(first, filename="0001.sql")}
    assert flagged == {"public.job", "public.job_event"}


def test_comments_strings_and_dollar_quotes_are_read_as_sql_reads_them() -> None:
    sql = """
-- CREATE TABLE commented (id int);
/* CREATE TABLE block_commented (id int); */
SELECT 'CREATE TABLE in_a_string (id int)';
DO $body$
BEGIN
    CREATE TABLE made_in_do (id int);
    RAISE NOTICE 'it''s CREATE TABLE quoted (id int)';
END
$body$;
CREATE TABLE "MixedCase" (id int);
ALTER TABLE "mixedcase" ENABLE ROW LEVEL SECURITY;
CREATE TABLE other.elsewhere (id int);
"""
    found = check_rls(sql, filename="x.sql")
    assert found == [
        Finding(Path("x.sql"), 7, RULE, found[0].message),
        Finding(Path("x.sql"), 11, RULE, found[1].message),
    ]
    assert "public.made_in_do" in found[0].message
    assert "public.MixedCase" in found[1].message


def test_a_function_body_is_not_run_by_the_revision_but_a_do_body_is() -> None:
    sql = """
CREATE FUNCTION make_later() RETURNS void LANGUAGE sql AS $fn$
    CREATE TABLE made_when_called (id int)
$fn$;
DO $$
BEGIN
    IF true THEN
        CREATE TABLE made_now (id int);
    END IF;
END
$$;
"""
    found = check_rls(sql, filename="x.sql")
    assert [(f.line, f.message.split()[1]) for f in found] == [(8, "public.made_now")]
