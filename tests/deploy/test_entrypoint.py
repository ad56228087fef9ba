"""deploy/entrypoint.sh against a real PostgreSQL: waits, gives up with a reason, or runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from tests.deploy.conftest import DEPLOY

pytestmark = pytest.mark.slow  # the entrypoint script as a process

ENTRYPOINT = DEPLOY / "entrypoint.sh"


def pg_env(url: URL, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PGHOST=url.host or "localhost",
        PGPORT=str(url.port or 5432),
        PGUSER=url.username or "postgres",
        PGDATABASE=url.database or "postgres",
        **extra,
    )
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    return env


def run(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *command], capture_output=True, text=True, env=env, check=False
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_runs_the_command_once_postgres_answers(pg_admin_url: URL) -> None:
    done = run(pg_env(pg_admin_url), "sh", "-c", "echo ran with $0", "it")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ran with it\n"
    assert "PostgreSQL answered" in done.stderr


def test_gives_up_after_the_bound_with_the_reason_and_runs_nothing(
    pg_admin_url: URL, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    unreachable = pg_admin_url.set(host="127.0.0.1", port=closed_port())
    env = pg_env(unreachable, HEIMDEX_DB_WAIT_SECONDS="2")
    done = run(env, "touch", str(marker))
    assert done.returncode == 1
    assert "PostgreSQL still unreachable after 2s" in done.stderr
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{unreachable.port}" in done.stderr
    assert not marker.exists()


def test_refuses_a_bad_wait_bound(pg_admin_url: URL) -> None:
    done = run(pg_env(pg_admin_url, HEIMDEX_DB_WAIT_SECONDS="soon"), "true")
    assert done.returncode == 2
    assert "HEIMDEX_DB_WAIT_SECONDS must be a whole number" in done.stderr


def test_needs_a_command() -> None:
    done = run(dict(os.environ))
    assert done.returncode == 2
    assert "usage:" in done.stderr
