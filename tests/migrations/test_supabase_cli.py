"""supabase/migrations/ applied by the real Supabase CLI, and files it could not apply refused."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from heimdex_db.context import DbContext
from heimdex_db.migrate import upgrade
from heimdex_db.supabase.artifacts import ArtifactsUnbatchable, sql
from heimdex_db.verify.schema import render_diff
from tests.dbutil import scalar, schema_of

from .conftest import REPO, HistoryCopy, heimdex

# The version docs/migrations.md states as tested; `npm i -E` pins it exactly.
SUPABASE_CLI_VERSION = "2.117.0"
CACHE = REPO / ".cache" / "supabase-cli"
ARTIFACTS = REPO / "supabase" / "migrations"


@pytest.fixture(scope="session")
def supabase_cli() -> Path:
    """The real Supabase CLI from npm, installed once into .cache/supabase-cli/<version>."""
    prefix = CACHE / SUPABASE_CLI_VERSION
    binary = prefix / "node_modules" / ".bin" / "supabase"
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed (scripts/install-deps.sh installs nodejs and npm)")
    prefix.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            npm,
            "i",
            "-E",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(prefix),
            f"supabase@{SUPABASE_CLI_VERSION}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"npm could not install supabase: {proc.stderr}"
    return binary


def supabase_push(cli: Path, migrations: Path, url: URL, work: Path) -> None:
    """`supabase db push` of a copy of `migrations`, from a project folder of its own."""
    project = work / "project"
    (project / "supabase").mkdir(parents=True)
    shutil.copytree(migrations, project / "supabase" / "migrations")
    (project / "supabase" / "config.toml").write_text('project_id = "heimdex"\n')
    db_url = url.set(drivername="postgresql", query={"sslmode": "disable"})
    proc = subprocess.run(
        [str(cli), "db", "push", "--db-url", db_url.render_as_string(hide_password=False), "--yes"],
        cwd=project,
        # HOME: the CLI keeps a profile and telemetry state there.
        env={**os.environ, "HOME": str(work), "SUPABASE_TELEMETRY_DISABLED": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow  # the Supabase CLI as a process
def test_the_supabase_cli_applies_the_artifacts_to_the_schema_alembic_builds(
    supabase_cli: Path, empty_db_url: URL, db_url: URL, tmp_path: Path
) -> None:
    supabase_push(supabase_cli, ARTIFACTS, empty_db_url, tmp_path)

    by_cli, by_alembic = schema_of(empty_db_url), schema_of(db_url)
    assert by_cli == by_alembic, render_diff(by_alembic, by_cli)
    files = sorted(p.stem.split("_")[0] for p in ARTIFACTS.glob("*.sql"))
    recorded = scalar(
        empty_db_url,
        "SELECT string_agg(version, ',' ORDER BY version) "
        "FROM supabase_migrations.schema_migrations",
    )
    assert recorded == ",".join(files)
    proc = heimdex(
        "db", "status", "--database-url", empty_db_url.render_as_string(hide_password=False)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow  # the Supabase CLI as a process
def test_a_new_concurrent_index_revision_is_applied_by_the_cli_like_alembic_does(
    supabase_cli: Path,
    history: HistoryCopy,
    empty_db_url: URL,
    create_database: Callable[..., URL],
    tmp_path: Path,
) -> None:
    history.add_revision(
        "cafe00000001",
        history.head,
        """
        op.execute("SET LOCAL lock_timeout = '5s'")
        op.add_column("job", sa.Column("region", sa.Text()))
        with op.get_context().autocommit_block():
            op.create_index(
                "idx_job__region", "job", ["region"], postgresql_concurrently=True
            )
            op.drop_index("idx_job__org_queue_turn", table_name="job", postgresql_concurrently=True)
        op.execute("COMMENT ON COLUMN job.region IS 'Data residency region'")
        """,
        message="job region",
    )
    out = tmp_path / "migrations"
    sql(DbContext.build(history.ini), output_dir=out)

    supabase_push(supabase_cli, out, empty_db_url, tmp_path)

    by_alembic = create_database()
    upgrade(DbContext.build(history.ini, database_url=by_alembic))
    assert schema_of(empty_db_url) == schema_of(by_alembic), render_diff(
        schema_of(by_alembic), schema_of(empty_db_url)
    )


@pytest.mark.slow  # every artifact compiled
def test_check_refuses_a_file_mixing_a_concurrent_index_with_other_statements(
    tmp_path: Path,
) -> None:
    out = tmp_path / "migrations"
    shutil.copytree(ARTIFACTS, out)
    concurrent = next(
        p
        for p in sorted(out.glob("*.sql"))
        if p.read_text().startswith("CREATE INDEX CONCURRENTLY")
    )
    concurrent.write_text(concurrent.read_text() + "\nANALYZE job;\n")

    proc = heimdex("db", "sql", "--check", "--output-dir", out)

    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert (
        f"  {concurrent}: CREATE INDEX CONCURRENTLY shares the file with 1 other statement(s); "
        "the Supabase CLI runs a file in one transaction, where it cannot run: give it a file "
        "of its own (an autocommit_block() in the revision)"
    ) in lines, proc.stderr


def test_sql_refuses_to_compile_a_concurrent_index_outside_an_autocommit_block(
    history: HistoryCopy, tmp_path: Path
) -> None:
    history.add_revision(
        "cafe00000002",
        history.head,
        """
        op.execute("SET LOCAL lock_timeout = '5s'")
        op.add_column("job", sa.Column("region", sa.Text()))
        op.execute("CREATE INDEX CONCURRENTLY idx_job__region ON job (region)")
        """,
        message="job region",
    )
    out = tmp_path / "migrations"

    with pytest.raises(ArtifactsUnbatchable) as refused:
        sql(DbContext.build(history.ini), output_dir=out)

    assert "(compiled from revision cafe00000002): CREATE INDEX CONCURRENTLY shares the file" in (
        str(refused.value)
    )
    assert not out.exists()
