"""`heimdex db squash --to REV`: a dumped baseline, and every database still served."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL

from heimdex_db.config import alembic_config
from heimdex_db.context import DbContext
from heimdex_db.migrate import upgrade
from heimdex_db.squash import comparable_lines, dump
from heimdex_db.supabase.artifacts import sql
from heimdex_db.verify.schema import render_diff
from tests.dbutil import execute, schema_of, version_of

from .conftest import COMMON, REPO, HistoryCopy, heimdex, revisions_of, url_arg
from .test_supabase_cli import supabase_cli, supabase_push

pytestmark = pytest.mark.slow  # histories squashed (pg_dump), rebuilt and walked

__all__ = ["supabase_cli"]  # the fixture, shared with the Supabase CLI tests

# The queue in the ledger: five revisions to squash, two after it that must keep working.
TO = "b8e2d4f6a1c3"


@pytest.fixture(scope="module")
def squashed(tmp_path_factory: pytest.TempPathFactory) -> HistoryCopy:
    root = tmp_path_factory.mktemp("squashed")
    shutil.copytree(
        COMMON / "alembic", root / "alembic", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(COMMON / "alembic.ini", root / "alembic.ini")
    copy = HistoryCopy(root)
    proc = heimdex("db", "squash", "--to", TO, "-c", copy.ini)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return copy


def _dumps_equal(a: URL, b: URL) -> None:
    # The Supabase CLI's own bookkeeping is not the ledger's schema.
    first, second = (dump(url, exclude_schemas=("supabase_migrations",)) for url in (a, b))
    assert comparable_lines(first.schema) == comparable_lines(second.schema)
    assert comparable_lines(first.data) == comparable_lines(second.data)


def test_the_chain_up_to_rev_becomes_one_baseline_with_rev_s_id(squashed: HistoryCopy) -> None:
    original = revisions_of()
    assert squashed.revisions == [TO, *original[original.index(TO) + 1 :]]
    scripts = ScriptDirectory.from_config(alembic_config(squashed.ini))
    baseline = scripts.get_revision(TO)
    assert baseline is not None and baseline.down_revision is None
    old_chain = squashed.root / "alembic" / "squashed" / TO / "alembic.ini"
    assert revisions_of(old_chain) == original[: original.index(TO) + 1]
    assert not list(squashed.versions.glob("001_*"))
    # The roles the RLS revision creates are created by the baseline too (pg_dump does not).
    upgrade_sql = next(squashed.versions.glob(f"{TO}_*.upgrade.sql")).read_text()
    assert "ARRAY['anon', 'authenticated', 'service_role']" in upgrade_sql


def test_a_fresh_database_from_the_baseline_equals_the_old_chain_at_head(
    squashed: HistoryCopy, empty_db_url: URL, db_url: URL
) -> None:
    proc = heimdex("db", "upgrade", "-c", squashed.ini, "--database-url", url_arg(empty_db_url))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    assert version_of(empty_db_url) == revisions_of()[-1]
    assert schema_of(empty_db_url) == schema_of(db_url), render_diff(
        schema_of(db_url), schema_of(empty_db_url)
    )
    # Functions, triggers, sequences, grants, policies and rows too: pg_dump's whole text.
    _dumps_equal(empty_db_url, db_url)
    status = heimdex("db", "status", "-c", squashed.ini, "--database-url", url_arg(empty_db_url))
    assert status.returncode == 0, status.stdout + status.stderr


def test_a_database_at_rev_or_later_keeps_upgrading_unchanged(
    squashed: HistoryCopy, create_database: Callable[..., URL], db_url: URL
) -> None:
    at_rev = create_database()
    upgrade(DbContext.build(database_url=at_rev), TO)
    execute(
        at_rev,
        "INSERT INTO job (org_id, type, status, params, request_fingerprint) "
        "VALUES (gen_random_uuid(), 'drive_ingest', 'queued', '{}', repeat('c', 64))",
    )

    proc = heimdex("db", "upgrade", "-c", squashed.ini, "--database-url", url_arg(at_rev))

    assert proc.returncode == 0, proc.stdout + proc.stderr
    applied = proc.stdout.split(" applied")[0].split(", ")
    assert applied == revisions_of()[revisions_of().index(TO) + 1 :]
    assert schema_of(at_rev) == schema_of(db_url)
    at_head = heimdex("db", "status", "-c", squashed.ini, "--database-url", url_arg(db_url))
    assert at_head.returncode == 0, at_head.stdout + at_head.stderr


def test_a_database_inside_the_squashed_chain_is_told_how_to_reach_rev(
    squashed: HistoryCopy, create_database: Callable[..., URL], db_url: URL
) -> None:
    inside = create_database()
    upgrade(DbContext.build(database_url=inside), "3af4686817cc")

    proc = heimdex("db", "upgrade", "-c", squashed.ini, "--database-url", url_arg(inside))

    assert proc.returncode == 1, proc.stdout + proc.stderr
    old_ini = squashed.root / "alembic" / "squashed" / TO / "alembic.ini"
    command = f"heimdex db upgrade {TO} -c {old_ini}"
    assert command in proc.stderr
    assert version_of(inside) == "3af4686817cc"

    # The command it names works, and then the squashed history takes over.
    first = heimdex(*command.split()[1:], "--database-url", url_arg(inside))
    assert first.returncode == 0, first.stdout + first.stderr
    then = heimdex("db", "upgrade", "-c", squashed.ini, "--database-url", url_arg(inside))
    assert then.returncode == 0, then.stdout + then.stderr
    assert schema_of(inside) == schema_of(db_url)


def test_the_baseline_s_supabase_file_keeps_the_numbers_of_the_files_after_it(
    squashed: HistoryCopy, supabase_cli: Path, empty_db_url: URL, db_url: URL, tmp_path: Path
) -> None:
    out = tmp_path / "migrations"
    sql(DbContext.build(squashed.ini), output_dir=out)

    before = sorted(p.name for p in (REPO / "supabase" / "migrations").glob("*.sql"))
    replaced = [name for name in before if name < "0009"]
    names = sorted(p.name for p in out.iterdir())
    assert replaced[-1] == "0008_queue_in_the_ledger_4.sql"
    assert names == [f"0008_baseline_{TO}.sql", *before[len(replaced) :]]
    # The real Supabase CLI applies them to the schema the old chain builds.
    supabase_push(supabase_cli, out, empty_db_url, tmp_path)
    _dumps_equal(empty_db_url, db_url)


def test_verify_passes_on_the_squashed_history(squashed: HistoryCopy, pg_admin_url: URL) -> None:
    # Up, down, up of the baseline and every later revision on seeded rows; models at head.
    proc = heimdex(
        "db",
        "verify",
        "-c",
        squashed.ini,
        "--skip-artifacts",
        "--database-url",
        url_arg(pg_admin_url),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ok: {TO} up/down/up with seeded rows" in proc.stdout


def test_lint_judges_the_revisions_after_the_baseline_only(squashed: HistoryCopy) -> None:
    proc = heimdex("db", "lint", "-c", squashed.ini)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("to", "message"),
    [
        ("001_job_ledger_init", "is the first revision: there is nothing to squash"),
        ("base", "squash --to needs a revision, not base"),
        ("nope", "'nope' is not a revision of this history"),
    ],
)
def test_squash_refuses_what_it_cannot_do_and_changes_nothing(
    history: HistoryCopy, to: str, message: str
) -> None:
    before = sorted(p.name for p in history.versions.iterdir())
    proc = heimdex("db", "squash", "--to", to, "-c", history.ini)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert sorted(p.name for p in history.versions.iterdir()) == before
    assert not (history.root / "alembic" / "squashed").exists()


def test_squash_runs_on_a_copy_of_this_repository_s_history_to_its_head(
    history: HistoryCopy, empty_db_url: URL, db_url: URL
) -> None:
    proc = heimdex("db", "squash", "--to", "head", "-c", history.ini)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert history.revisions == [revisions_of()[-1]]
    upgrade(DbContext.build(history.ini, database_url=empty_db_url))
    _dumps_equal(empty_db_url, db_url)
