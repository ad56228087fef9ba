"""`heimdex db lint`: unsafe revisions fail, acknowledged ones pass, the existing ones pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from heimdex.errors import HeimdexError
from heimdex_db.context import DbContext
from heimdex_db.lint.command import MARKER, lint
from heimdex_db.lint.findings import OWN_RULES, RLS_BASELINE_REVISION

from .conftest import COMMON, HistoryCopy, heimdex, revisions_of

LOCK = "op.execute(\"SET LOCAL lock_timeout = '5s'\")"


def _marker_rules(versions: Path) -> int:
    """How many rules the history's `heimdex-lint: ignore[...]` markers acknowledge."""
    count = 0
    for path in versions.glob("*.py"):
        for line in path.read_text().splitlines():
            m = MARKER.search(line)
            if m:
                count += len([r for r in m.group(1).split(",") if r.strip()])
    return count


@pytest.mark.slow
def test_the_existing_revisions_pass_with_their_acknowledgements() -> None:
    proc = heimdex("db", "lint")
    assert proc.returncode == 0, proc.stdout
    # Every marker of the history is used (an unused one is a finding), and every revision read.
    acknowledged = _marker_rules(COMMON / "alembic" / "versions")
    assert acknowledged > 0
    assert (
        f"0 finding(s), {acknowledged} acknowledged, {len(revisions_of())} revision(s) checked"
        in proc.stderr
    )


def _line_of(path: Path, needle: str) -> int:
    lines = path.read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if needle in line)


@pytest.mark.slow
def test_an_unsafe_revision_fails_with_file_line_rule_message(history: HistoryCopy) -> None:
    path = history.add_revision(
        "bad000000001",
        history.head,
        """
        op.execute("CREATE TYPE job_region AS ENUM ('eu', 'us')")
        op.add_column("job", sa.Column("region", sa.String(2)))
        op.add_column("job", sa.Column("tenant_tier", sa.Integer(), nullable=False))
        op.execute("ALTER TABLE job ALTER COLUMN region TYPE job_region")
        op.create_index("idx_job__region", "job", ["region"])
        op.execute("ALTER TABLE job ADD CONSTRAINT ck_job__tier CHECK (tenant_tier > 0)")
        """,
        """
        op.drop_column("job", "region")
        op.drop_column("job", "tenant_tier")
        """,
    )
    proc = heimdex("db", "lint", "-c", history.ini)
    assert proc.returncode == 1
    found = set(proc.stdout.splitlines())
    expect = {
        (_line_of(path, "def upgrade"), "missing-lock-timeout"),
        (_line_of(path, "def downgrade"), "missing-lock-timeout"),
        (_line_of(path, "CREATE TYPE job_region"), "enum-not-dropped"),
        (_line_of(path, 'tenant_tier", sa.Integer'), "not-null-without-default"),
        (_line_of(path, 'TYPE job_region")'), "enum-without-using"),
        (_line_of(path, "op.create_index"), "index-not-concurrent"),
        (_line_of(path, "ADD CONSTRAINT"), "constraint-missing-not-valid"),  # squawk's
    }
    for line, rule in expect:
        assert any(f.startswith(f"{path}:{line} {rule} ") for f in found), (line, rule, found)
    using = next(f for f in found if " enum-without-using " in f)
    assert "job.region changed to enum job_region without USING" in using
    # Only the new revision is reported: the history before it is acknowledged.
    assert all(f.startswith(str(path)) for f in found)


def test_a_table_created_in_the_same_revision_is_not_flagged(history: HistoryCopy) -> None:
    history.add_revision(
        "new000000001",
        history.head,
        f"""
        {LOCK}
        op.create_table(
            "job_tag",
            sa.Column("job_id", sa.Uuid(), nullable=False),
            sa.Column("tag", sa.Text(), nullable=False),
        )
        op.execute("ALTER TABLE job_tag ENABLE ROW LEVEL SECURITY")
        op.create_index("idx_job_tag__tag", "job_tag", ["tag"])
        op.add_column("job_tag", sa.Column("weight", sa.Integer(), nullable=False))
        """,
        f"""
        {LOCK}
        op.drop_table("job_tag")
        """,
    )
    report = lint(DbContext.build(history.ini), revisions=["new0"])
    assert report.findings == []


def test_a_marker_acknowledges_one_finding_and_needs_a_reason(history: HistoryCopy) -> None:
    path = history.add_revision(
        "ack000000001",
        history.head,
        f"""
        {LOCK}
        # heimdex-lint: ignore[index-not-concurrent] job_event is append-only and tiny here
        op.create_index("idx_job_event__next_status", "job_event", ["next_status"])
        # heimdex-lint: ignore[index-not-concurrent]
        op.create_index("idx_job__type", "job", ["type"])
        op.create_index("idx_job__priority", "job", ["priority"])
        """,
        f"""
        {LOCK}
        op.drop_index("idx_job__priority")
        op.drop_index("idx_job__type")
        op.drop_index("idx_job_event__next_status")
        """,
    )
    report = lint(DbContext.build(history.ini), revisions=["ack"])
    rendered = [f.render() for f in report.findings]
    priority = _line_of(path, 'idx_job__priority", "job')
    assert report.acknowledged == 1
    assert rendered == [
        f"{path}:{_line_of(path, 'ignore[index-not-concurrent]') + 2} lint-marker-without-reason "
        "ignore[index-not-concurrent] needs a reason after the bracket",
        f"{path}:{priority} index-not-concurrent "
        "CREATE INDEX on existing table job without CONCURRENTLY blocks its writes while the "
        "index builds (use op.create_index(..., postgresql_concurrently=True) in an "
        "autocommit_block)",
    ]


@pytest.mark.slow
def test_a_table_created_without_rls_after_the_baseline_is_flagged(history: HistoryCopy) -> None:
    bare = history.add_revision(
        "rls000000001",
        history.head,
        f"""
        {LOCK}
        op.create_table(
            "job_note",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("note", sa.Text(), nullable=False),
        )
        op.execute("ALTER TABLE job_note ENABLE ROW LEVEL SECURITY")
        op.execute("CREATE TABLE job_audit (id bigint PRIMARY KEY, what text)")
        op.execute("COMMENT ON TABLE job_audit IS 'who did what'")
        """,
        f"""
        {LOCK}
        op.drop_table("job_audit")
        op.drop_table("job_note")
        """,
    )
    proc = heimdex("db", "lint", "-c", history.ini)
    assert proc.returncode == 1, proc.stderr
    # Only job_audit, at the line that creates it (after a multi-line CREATE TABLE job_note).
    assert proc.stdout.splitlines() == [
        f"{bare}:{_line_of(bare, 'CREATE TABLE job_audit')} table-without-rls "
        "table public.job_audit is created without ENABLE ROW LEVEL SECURITY: Supabase's Data "
        "API exposes it to anon and authenticated; enable RLS on it in the same revision "
        "(with policies, or none for a backend-only table)"
    ]
    # The usual marker acknowledges it.
    text = bare.read_text()
    assert text.count('    op.execute("CREATE TABLE job_audit') == 1
    bare.write_text(
        text.replace(
            '    op.execute("CREATE TABLE job_audit',
            "    # heimdex-lint: ignore[table-without-rls] a scratch table, dropped next\n"
            '    op.execute("CREATE TABLE job_audit',
        )
    )
    report = lint(DbContext.build(history.ini), revisions=["rls0"])
    assert (report.findings, report.acknowledged) == ([], 1)


@pytest.mark.slow
def test_a_table_created_with_rls_after_the_baseline_passes(history: HistoryCopy) -> None:
    history.add_revision(
        "rls000000002",
        history.head,
        f"""
        {LOCK}
        op.create_table(
            "job_note",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("note", sa.Text(), nullable=False),
        )
        op.execute("COMMENT ON TABLE job_note IS 'Notes; backend only'")
        op.execute("ALTER TABLE public.job_note ENABLE ROW LEVEL SECURITY")
        """,
        f"""
        {LOCK}
        op.drop_table("job_note")
        """,
    )
    proc = heimdex("db", "lint", "-c", history.ini)
    assert proc.returncode == 0, proc.stdout
    acknowledged = _marker_rules(history.versions)
    assert (
        f"0 finding(s), {acknowledged} acknowledged, {len(history.revisions)} revision(s) checked"
        in proc.stderr
    )


def test_revisions_up_to_the_baseline_are_not_checked_for_rls() -> None:
    """001 and 3af created job and job_event without RLS; the baseline revision covers them."""
    assert RLS_BASELINE_REVISION in revisions_of()
    report = lint(DbContext.build())
    assert [f for f in report.findings if f.rule == "table-without-rls"] == []


def test_what_breaks_the_online_promise_is_flagged_at_its_line(history: HistoryCopy) -> None:
    path = history.add_revision(
        "onl000000001",
        history.head,
        f"""
        {LOCK}
        op.execute("ALTER TABLE job ALTER COLUMN type TYPE varchar(200)")
        op.execute("ALTER TABLE job ADD COLUMN token uuid DEFAULT gen_random_uuid()")
        op.execute("ALTER TABLE job ADD CONSTRAINT ck_job__attempt CHECK (attempt >= 0)")
        op.execute("ALTER TABLE job ALTER COLUMN stage SET NOT NULL")
        op.execute("UPDATE job SET priority = 0 WHERE priority IS NULL")
        op.execute("ALTER TABLE job ADD CONSTRAINT ck_job__prio CHECK (priority >= 0) NOT VALID")
        op.execute("ALTER TABLE job ADD COLUMN note text DEFAULT now()::text")
        with op.get_context().autocommit_block():
            op.execute("ALTER TABLE job VALIDATE CONSTRAINT ck_job__prio")
            op.execute("ALTER TABLE job DROP COLUMN note")
        """,
    )
    report = lint(DbContext.build(history.ini), revisions=["onl"])
    found = {(f.line, f.rule) for f in report.findings}
    expected = {
        (_line_of(path, "TYPE varchar(200)"), "table-rewrite"),
        (_line_of(path, "gen_random_uuid()"), "table-rewrite"),
        (_line_of(path, "CHECK (attempt >= 0)"), "validation-under-lock"),
        (_line_of(path, "SET NOT NULL"), "validation-under-lock"),
        (_line_of(path, "UPDATE job SET priority"), "backfill-in-one-statement"),
        (_line_of(path, "DROP COLUMN note"), "missing-lock-timeout"),
    }
    assert expected <= found, sorted(found)
    # NOT VALID, a stable default, and VALIDATE outside the transaction are the online way.
    for clean in ("NOT VALID", "DEFAULT now()", "VALIDATE CONSTRAINT"):
        assert not any(line == _line_of(path, clean) for line, _rule in found), (clean, found)


def test_a_revision_written_with_the_online_toolkit_passes(history: HistoryCopy) -> None:
    history.add_revision(
        "onl000000002",
        history.head,
        """
        set_lock_timeout()
        with online():
            ddl("ALTER TABLE job ADD COLUMN IF NOT EXISTS region_new varchar(32)")
            backfill(
                "job",
                pending="region_new IS NULL",
                steps="s AS (UPDATE job j SET region_new = 'eu' FROM batch b WHERE j.id = b.id)",
            )
            add_check("job", "ck_job__region_new", "region_new IS NOT NULL")
            create_index("idx_job__region_new", "job", "(region_new)")
        """,
        header="from heimdex_db.online import (\n"
        "    add_check, backfill, create_index, ddl, online, set_lock_timeout,\n)\n",
    )
    report = lint(DbContext.build(history.ini), revisions=["onl"])
    assert report.findings == []


def test_sql_is_read_as_postgresql_reads_it(history: HistoryCopy) -> None:
    """Comments, string literals and DO bodies are what they are, not SQL the rules misread."""
    path = history.add_revision(
        "pg0000000001",
        history.head,
        """
        op.execute("/* writers must not wait */ SET LOCAL lock_timeout = '5s'")
        op.execute("COMMENT ON TABLE job IS 'CREATE TYPE fake AS ENUM (''a'')'")
        op.execute("-- one statement, on purpose\\nUPDATE job SET stage = 'no LIMIT here'")
        op.execute("ALTER TABLE job ADD CHECK (attempt >= 0)")
        op.execute("DO $body$ BEGIN UPDATE job SET stage = NULL; END $body$")
        """,
        LOCK,
    )
    report = lint(DbContext.build(history.ini), ["pg00"])
    found = {(f.line, f.rule) for f in report.findings if f.rule in OWN_RULES}
    # The regex grammar missed the first two (a LIMIT in a string, a leading comment; an
    # unnamed constraint) and flagged a missing lock_timeout and a fake enum never dropped.
    assert found == {
        (_line_of(path, "no LIMIT here"), "backfill-in-one-statement"),
        (_line_of(path, "ADD CHECK"), "validation-under-lock"),
    }


def test_sql_the_database_would_reject_is_an_error_naming_its_line(history: HistoryCopy) -> None:
    path = history.add_revision(
        "pg0000000002", history.head, f'{LOCK}\nop.execute("ALTER TABLE job ADD COLUMN")', LOCK
    )
    with pytest.raises(HeimdexError, match=f"{path}:{_line_of(path, 'ADD COLUMN')}: PostgreSQL"):
        lint(DbContext.build(history.ini), ["pg00"])
