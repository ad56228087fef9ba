"""The playbook's "Common Issues & Fixes", each reproduced, and what the tool does now."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from heimdex_db.context import DbContext
from heimdex_db.lint.command import lint

from .conftest import REPO, HistoryCopy, clean_env, heimdex, heimdex_process, read_only, url_arg

pytestmark = pytest.mark.slow  # `heimdex db` as a process


def test_modulenotfounderror_no_pythonpath_needed_from_any_directory(
    tmp_path: Path, empty_db_url: URL
) -> None:
    env = clean_env()
    assert "PYTHONPATH" not in env
    # The console script in a process of its own: what it can import is the point.
    proc = heimdex_process(
        "db", "upgrade", "--database-url", url_arg(empty_db_url), cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "ModuleNotFoundError" not in proc.stderr
    proc = heimdex_process("db", "sql", "--check", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr


def test_permission_denied_under_app_names_output_dir_and_output_dir_works(
    history: HistoryCopy, tmp_path: Path
) -> None:
    with read_only(history.versions):
        proc = heimdex("db", "revision", "-m", "add region", "-c", history.ini)
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: cannot write to {history.versions}: ")
        assert "pass --output-dir" in line
        out = tmp_path / "scratch"
        ok = heimdex("db", "revision", "-m", "add region", "-c", history.ini, "--output-dir", out)
    assert ok.returncode == 0, ok.stderr
    written = Path(ok.stdout.strip())
    assert written.parent == out and written.name.endswith("_add_region.py")


def test_column_cannot_be_cast_automatically_lint_names_the_missing_using(
    history: HistoryCopy,
) -> None:
    path = history.add_revision(
        "enum00000001",
        history.head,
        """
        op.execute("SET LOCAL lock_timeout = '5s'")
        op.execute("CREATE TYPE job_priority AS ENUM ('low', 'high')")
        op.alter_column("job", "type", type_=sa.Enum(name="job_priority", create_type=False))
        """,
        """
        op.execute("SET LOCAL lock_timeout = '5s'")
        op.alter_column("job", "type", type_=sa.String(100))
        op.execute("DROP TYPE job_priority")
        """,
    )
    report = lint(DbContext.build(history.ini), revisions=["enum0"])
    rules = [(f.path, f.rule) for f in report.findings]
    assert (path, "enum-without-using") in rules
    # (autogenerate renders USING: test_revision.test_varchar_to_enum_autogenerates_...)


def test_no_such_file_or_directory_for_compiled_sql_the_directory_is_created(
    tmp_path: Path,
) -> None:
    out = tmp_path / "image" / "without" / "supabase" / "migrations"
    proc = heimdex("db", "sql", "--output-dir", out)
    assert proc.returncode == 0, proc.stderr
    # The repository's artifacts, compiled afresh into the new directory.
    committed = sorted(p.name for p in (REPO / "supabase" / "migrations").glob("*.sql"))
    assert committed[:2] == ["0001_job_ledger_init.sql", "0002_job_ledger_hardening.sql"]
    assert sorted(p.name for p in out.iterdir()) == committed
    for name in committed:
        assert (out / name).read_bytes() == (REPO / "supabase" / "migrations" / name).read_bytes()


def test_unwritable_artifact_directory_is_one_line_naming_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    with read_only(out):
        proc = heimdex("db", "sql", "--output-dir", out / "migrations")
    assert proc.returncode == 1
    assert "choose a writable --output-dir" in proc.stderr
    assert "Traceback" not in proc.stderr
