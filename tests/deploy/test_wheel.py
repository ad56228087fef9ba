"""The wheels as a user installs them: `heimdex` and `heimdex-db` in a fresh virtualenv, run from
a directory that is not the checkout, without PYTHONPATH, migrate a new database to head."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL

from heimdex.db import make_engine
from heimdex_db.config import VERSION_TABLE_SCHEMA
from tests.migrations.conftest import head

pytestmark = pytest.mark.slow  # builds and installs the wheels

REPO = Path(__file__).resolve().parents[2]
UV = os.environ.get("UV") or shutil.which("uv")


def _clean_env() -> dict[str, str]:
    """No database settings, no path into the checkout, no project environment of uv's."""
    dropped = ("DATABASE_URL", "PYTHONPATH", "VIRTUAL_ENV", "ALEMBIC_CONFIG")
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PG") and k not in dropped and not k.startswith("UV_PROJECT")
    }


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"{args}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.skipif(UV is None, reason="uv is not installed")
def test_the_installed_wheels_migrate_a_new_database_to_head(
    tmp_path: Path, empty_db_url: URL
) -> None:
    assert UV is not None
    dist, venv, elsewhere = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    for package in ("heimdex", "heimdex-db"):
        _run(UV, "build", "--quiet", "--wheel", "--package", package, "-o", dist, cwd=REPO)
    wheels = sorted(dist.glob("*.whl"))
    assert [w.name.split("-")[0] for w in wheels] == ["heimdex", "heimdex_db"]
    # The versions the lock file names, as a deployment installs them (from uv's cache).
    constraints = tmp_path / "constraints.txt"
    _run(UV, "export", "--quiet", "--frozen", "--no-hashes", "--no-dev", "--no-emit-workspace",
         "--no-header", "--package", "heimdex-db", "-o", constraints, cwd=REPO)  # fmt: skip
    _run(UV, "venv", "--quiet", "--python", sys.executable, venv, cwd=elsewhere)
    python = venv / "bin" / "python"
    _run(UV, "pip", "install", "--quiet", "--python", python, "-c", constraints, *wheels,
         cwd=elsewhere)  # fmt: skip

    # The toolchain finds alembic.ini and the history inside the installed package.
    where = _run(python, "-c", "import heimdex_db.config as c; print(c.DEFAULT_INI)", cwd=elsewhere)
    ini = Path(where.stdout.strip())
    assert ini.is_relative_to(venv), ini
    assert (ini.parent / "alembic" / "versions").is_dir()

    url = empty_db_url.render_as_string(hide_password=False)
    heimdex = venv / "bin" / "heimdex"
    upgraded = _run(heimdex, "db", "upgrade", "--database-url", url, cwd=elsewhere)
    assert upgraded.stdout.strip().endswith(f"now at {head()}"), upgraded.stdout
    status = _run(heimdex, "db", "status", "--database-url", url, cwd=elsewhere)
    assert "up to date" in status.stdout, status.stdout
    engine = make_engine(empty_db_url)
    try:
        with engine.connect() as conn:
            stamped = conn.execute(
                text(f"SELECT version_num FROM {VERSION_TABLE_SCHEMA}.alembic_version")
            ).scalars()
            assert list(stamped) == [head()]
    finally:
        engine.dispose()
    # The runtime library works installed too: the operator's console reads the new ledger.
    stats = _run(heimdex, "jobs", "--database-url", url, "stats", cwd=elsewhere)
    assert stats.stdout.startswith("STATUS")
