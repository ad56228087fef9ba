"""`heimdex db sql`: Supabase artifacts, byte for byte the playbook's, applied as Supabase does."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from heimdex_db.config import alembic_config
from heimdex_db.context import DbContext
from heimdex_db.migrate import upgrade
from heimdex_db.status import status
from heimdex_db.supabase.artifacts import ArtifactsStale, compile_artifacts, sql
from heimdex_db.verify.schema import render_diff, snapshot
from tests.dbutil import scalar
from tests.inprocess import alembic

from .conftest import COMMON, REPO, HistoryCopy, clean_env, heimdex, revisions_of, url_arg
from .test_online import EVENTS_CHECKSUM, LOAD, ROWS_CHECKSUM

ARTIFACTS = REPO / "supabase" / "migrations"


def _playbook_sql(range_: str, *, process: bool = False) -> bytes:
    """The playbook's verbatim step 3 (without docker): stdout of `alembic upgrade ... --sql`,
    as a process (the command line as typed) or in this one (the same entry function)."""
    env = clean_env(ALEMBIC_CONFIG=str(COMMON / "alembic.ini"), PYTHONPATH=str(COMMON / "src"))
    if not process:
        proc = alembic("upgrade", range_, "--sql", cwd=COMMON, env=env)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout
    return subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", range_, "--sql"],
        cwd=COMMON,
        env=env,
        capture_output=True,
        check=True,
    ).stdout


@pytest.mark.slow
def test_committed_artifacts_are_the_playbook_commands_output_byte_for_byte() -> None:
    names = sorted(p.name for p in ARTIFACTS.glob("*.sql"))
    assert names[:2] == ["0001_job_ledger_init.sql", "0002_job_ledger_hardening.sql"]
    assert (ARTIFACTS / "0001_job_ledger_init.sql").read_bytes() == _playbook_sql(
        "001_job_ledger_init", process=True
    )
    # Each revision's files, concatenated, are the playbook's output for it (a revision with an
    # autocommit block is cut into several files where Alembic commits).
    revisions = revisions_of()
    files: dict[str, list[str]] = {}
    for artifact in compile_artifacts(alembic_config()):
        files.setdefault(artifact.revision, []).append(artifact.name)
    assert list(files) == revisions
    assert sorted(n for group in files.values() for n in group) == names
    for i in range(1, len(revisions)):
        joined = b"".join((ARTIFACTS / n).read_bytes() for n in files[revisions[i]])
        span = f"{revisions[i - 1]}:{revisions[i]}"
        # The first and the last as the command line, the others in this process.
        assert joined == _playbook_sql(span, process=i == len(revisions) - 1), revisions[i]
    # A published revision keeps its one file; a new one with a concurrent build gets several.
    assert files["3af4686817cc"] == ["0002_job_ledger_hardening.sql"]
    assert len(files["b8e2d4f6a1c3"]) > 1


@pytest.mark.slow
def test_check_passes_on_the_repository_and_twice_compiled_is_identical(tmp_path: Path) -> None:
    proc = heimdex("db", "sql", "--check")
    assert proc.returncode == 0, proc.stderr
    sql(DbContext.build(), output_dir=tmp_path / "a")
    sql(DbContext.build(), output_dir=tmp_path / "b")
    for first in (tmp_path / "a").iterdir():
        assert first.read_bytes() == (tmp_path / "b" / first.name).read_bytes()


@pytest.mark.slow
def test_check_fails_naming_the_file_after_a_revision_changes(
    history: HistoryCopy, tmp_path: Path
) -> None:
    out = tmp_path / "migrations"
    sql(DbContext.build(history.ini), output_dir=out)
    hardening = history.versions / "3af4686817cc_hardening_job_ledger_enums_indexes.py"
    hardening.write_text(
        hardening.read_text().replace(
            "CODE_MAX, MESSAGE_MAX = 64, 2048", "CODE_MAX, MESSAGE_MAX = 80, 2048"
        )
    )
    proc = heimdex("db", "sql", "--check", "-c", history.ini, "--output-dir", out)
    assert proc.returncode == 1
    assert (
        f"{out / '0002_job_ledger_hardening.sql'}: stale (differs from revision 3af4686817cc)"
        in (proc.stderr)
    )
    assert "0001_job_ledger_init.sql" not in proc.stderr


def test_check_names_missing_and_unexpected_files(history: HistoryCopy, tmp_path: Path) -> None:
    out = tmp_path / "migrations"
    compiled = len(sql(DbContext.build(history.ini), output_dir=out).written)
    history.add_revision(
        "beef00000001",
        history.head,
        "op.execute(\"SET LOCAL lock_timeout = '5s'\")",
        message="add job region",
    )
    (out / "0009_hand_written.sql").write_text("SELECT 1;\n")
    with pytest.raises(ArtifactsStale) as info:
        sql(DbContext.build(history.ini), output_dir=out, check=True)
    missing = out / f"{compiled + 1:04d}_add_job_region.sql"
    assert f"{missing}: missing (compiled from revision beef00000001)" in str(info.value)
    assert f"{out / '0009_hand_written.sql'}: unexpected" in str(info.value)


def _apply_like_supabase(url: URL, files: list[Path]) -> None:
    """Each file as one simple-protocol query: one implicit transaction per file (the files
    carry Alembic's BEGIN/COMMIT too), and a lone non-transactional statement runs as itself."""
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for path in files:
            conn.execute(path.read_text().encode())


def _schema(url: URL) -> dict[str, object]:
    engine = create_engine(url)
    with engine.connect() as conn:
        result = snapshot(conn)
    engine.dispose()
    return result


@pytest.mark.slow
def test_artifacts_applied_in_order_give_the_alembic_schema_at_head(
    empty_db_url: URL, db_url: URL
) -> None:
    _apply_like_supabase(empty_db_url, sorted(ARTIFACTS.glob("*.sql")))
    from_artifacts, from_alembic = _schema(empty_db_url), _schema(db_url)
    assert from_artifacts == from_alembic, render_diff(from_alembic, from_artifacts)
    # Alembic sees it at head, and the models match it.
    proc = heimdex("db", "status", "--database-url", url_arg(empty_db_url))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_statement_that_cannot_run_in_a_transaction_gets_a_file_of_its_own(
    history: HistoryCopy, tmp_path: Path, empty_db_url: URL, create_database: Callable[..., URL]
) -> None:
    head = history.head
    existing = sorted(p.name for p in ARTIFACTS.glob("*.sql"))
    history.add_revision(
        "face00000001",
        head,
        """
        op.execute("SET LOCAL lock_timeout = '5s'")
        op.add_column("job", sa.Column("region", sa.Text()))
        with op.get_context().autocommit_block():
            op.create_index(
                "idx_job__region", "job", ["region"], postgresql_concurrently=True
            )
        op.execute("COMMENT ON COLUMN job.region IS 'Data residency region'")
        """,
        """
        op.execute("SET LOCAL lock_timeout = '5s'")
        with op.get_context().autocommit_block():
            op.drop_index("idx_job__region", table_name="job", postgresql_concurrently=True)
        op.drop_column("job", "region")
        """,
        message="job region",
    )
    out = tmp_path / "migrations"
    sql(DbContext.build(history.ini), output_dir=out)
    names = sorted(p.name for p in out.iterdir())
    n = len(existing)
    assert names == [
        *existing,
        f"{n + 1:04d}_job_region.sql",
        f"{n + 2:04d}_job_region_2.sql",
        f"{n + 3:04d}_job_region_3.sql",
    ]
    assert (out / f"{n + 2:04d}_job_region_2.sql").read_text().strip() == (
        "CREATE INDEX CONCURRENTLY idx_job__region ON job (region);"
    )
    # The three files together are the playbook's output for the revision.
    whole = b"".join((out / name).read_bytes() for name in names[n:])
    env = clean_env()
    playbook = subprocess.run(
        [
            sys.executable,
            "-m",
            "alembic",
            "-c",
            str(history.ini),
            "upgrade",
            f"{head}:face00000001",
            "--sql",
        ],
        env=env,
        capture_output=True,
        check=True,
    ).stdout
    assert whole == playbook
    _apply_like_supabase(empty_db_url, [out / name for name in names])
    by_alembic = create_database()
    upgrade(DbContext.build(history.ini, database_url=by_alembic))
    assert _schema(empty_db_url) == _schema(by_alembic)
    assert status(DbContext.build(history.ini, database_url=empty_db_url)).current == (
        "face00000001",
    )


@pytest.mark.slow
def test_the_online_revision_s_artifacts_on_rows_do_what_the_upgrade_does(
    create_database: Callable[..., URL],
) -> None:
    """3af4686817cc's files (batched backfill as a DO block that COMMITs) on real rows."""
    seed = create_database()
    upgrade(DbContext.build(database_url=seed), "001_job_ledger_init")
    engine = create_engine(seed)
    with engine.begin() as conn:
        conn.execute(text(LOAD), {"rows": 30_000})
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE job"))
    engine.dispose()
    by_files, by_upgrade = (
        create_database(template=seed.database),
        create_database(template=seed.database),
    )
    files = [
        ARTIFACTS / a.name
        for a in compile_artifacts(alembic_config())
        if a.revision == "3af4686817cc"
    ]
    _apply_like_supabase(by_files, files)
    upgrade(DbContext.build(database_url=by_upgrade), "3af4686817cc")
    assert scalar(by_files, "SELECT count(*) FROM job") == 30_000
    assert scalar(by_files, ROWS_CHECKSUM) == scalar(by_upgrade, ROWS_CHECKSUM)
    assert scalar(by_files, EVENTS_CHECKSUM) == scalar(by_upgrade, EVENTS_CHECKSUM)
    assert _schema(by_files) == _schema(by_upgrade)
