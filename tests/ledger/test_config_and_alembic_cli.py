"""Settings, URLs and the plain `alembic` commands of the playbook, run as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from heimdex.db import check_connection, make_engine
from heimdex.errors import DatabaseUnavailable, HeimdexError
from heimdex.settings import Settings, load_settings
from heimdex_db.config import alembic_config, script_directory
from heimdex_db.localpg import LocalPostgres, create_database

REPO = Path(__file__).resolve().parents[2]
COMMON = REPO / "packages" / "common"
NASTY_PASSWORD = "p%40ss@w/rd:%#?"


def _libpq_env(url: URL, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    env.update(
        PGHOST=url.host or "",
        PGPORT=str(url.port),
        PGUSER=url.username or "",
        PGDATABASE=url.database or "",
    )
    env.update(extra)
    return env


def test_database_url_wins_over_libpq_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "pg")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@db.example:6543/ledger")
    url = Settings().sqlalchemy_url
    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql+psycopg",
        "db.example",
        6543,
        "ledger",
    )


def test_libpq_password_with_special_characters_is_not_mangled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("PGHOST", "pg")
    monkeypatch.setenv("PGPASSWORD", NASTY_PASSWORD)
    url = Settings().sqlalchemy_url
    assert url.host == "pg"
    assert url.password == NASTY_PASSWORD
    assert NASTY_PASSWORD not in str(url)
    assert NASTY_PASSWORD not in repr(Settings())


def test_placeholder_secret_is_refused_outside_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEIMDEX_ENV", "prod")
    monkeypatch.delenv("HEIMDEX_JWT_SECRET", raising=False)
    with pytest.raises(ValueError, match="HEIMDEX_JWT_SECRET"):
        Settings()
    # The placeholder before issue 15 (26 bytes) is refused as well.
    monkeypatch.setenv("HEIMDEX_JWT_SECRET", "local-dev-secret-change-me")
    with pytest.raises(ValueError, match="HEIMDEX_JWT_SECRET"):
        Settings()


def test_a_local_token_is_signed_without_a_key_length_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import jwt

    monkeypatch.delenv("HEIMDEX_JWT_SECRET", raising=False)
    monkeypatch.delenv("HEIMDEX_ENV", raising=False)
    secret = Settings().jwt_secret.get_secret_value()
    assert len(secret.encode()) >= 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token = jwt.encode({"sub": "x"}, secret, algorithm="HS256")
        assert jwt.decode(token, secret, algorithms=["HS256"]) == {"sub": "x"}


def test_log_settings_are_validated_and_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEIMDEX_LOG_FORMAT", "JSON")
    monkeypatch.setenv("HEIMDEX_LOG_LEVEL", "Debug")
    settings = Settings()
    assert (settings.log_format, settings.log_level) == ("json", "debug")
    monkeypatch.setenv("HEIMDEX_LOG_FORMAT", "xml")
    with pytest.raises(HeimdexError, match="HEIMDEX_LOG_FORMAT: Input should be 'auto'"):
        load_settings()


@pytest.mark.slow
def test_password_with_special_characters_authenticates(tmp_path: Path) -> None:
    """A real server with password auth: the `%@/` password reaches it intact."""
    with LocalPostgres.throwaway() as cluster:
        admin = create_engine(cluster.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("SET password_encryption = 'scram-sha-256'"))
            conn.execute(
                # CREATEROLE: the history creates the NOLOGIN roles its policies name.
                text(
                    "CREATE ROLE app LOGIN CREATEROLE PASSWORD '"
                    + NASTY_PASSWORD.replace("'", "''")
                    + "'"
                )
            )
            create_database(conn, "appdb", owner="app")
        hba = cluster.datadir / "pg_hba.conf"
        hba.write_text("host all app 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_reload_conf()"))
        admin.dispose()

        env = _libpq_env(cluster.url("appdb"), PGUSER="app", PGPASSWORD=NASTY_PASSWORD)
        ok = subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=COMMON,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert ok.returncode == 0, ok.stderr
        assert NASTY_PASSWORD not in ok.stdout + ok.stderr

        env["PGPASSWORD"] = NASTY_PASSWORD + "wrong"
        bad = subprocess.run(
            [sys.executable, "-m", "alembic", "current"],
            cwd=COMMON,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert bad.returncode != 0
        assert "Traceback" not in bad.stderr
        assert NASTY_PASSWORD not in bad.stdout + bad.stderr
        assert "password authentication failed" in bad.stderr


def test_unreachable_database_is_one_clear_line() -> None:
    engine = make_engine(
        URL.create(
            "postgresql",
            username="u",
            password="s3cret",
            host="127.0.0.1",
            port=1,
            database="ledger",
        )
    )
    with pytest.raises(DatabaseUnavailable) as info:
        check_connection(engine)
    message = str(info.value)
    assert message == "cannot connect to PostgreSQL at 127.0.0.1:1/ledger as u: Connection refused"
    assert "s3cret" not in message
    assert "\n" not in message


@pytest.mark.slow
def test_alembic_cli_unreachable_database_has_no_traceback() -> None:
    env = _libpq_env(
        URL.create("postgresql", host="127.0.0.1", port=1, username="u", database="ledger"),
        PGPASSWORD="hunter2",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=COMMON,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "cannot connect to PostgreSQL at 127.0.0.1:1/ledger" in proc.stderr
    assert "hunter2" not in proc.stderr


@pytest.mark.slow
def test_playbook_command_verbatim(empty_db_url: URL) -> None:
    """cd packages/common && ALEMBIC_CONFIG=... PYTHONPATH=... python -m alembic ..."""
    env = _libpq_env(
        empty_db_url, ALEMBIC_CONFIG=str(COMMON / "alembic.ini"), PYTHONPATH=str(COMMON / "src")
    )
    for args in (["upgrade", "head"], ["downgrade", "001_job_ledger_init"], ["upgrade", "head"]):
        proc = subprocess.run(
            [sys.executable, "-m", "alembic", *args],
            cwd=COMMON,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
    engine = create_engine(empty_db_url)
    with engine.connect() as conn:
        version = conn.execute(text("SELECT version_num FROM heimdex_private.alembic_version"))
        assert version.scalar() == script_directory(alembic_config()).get_current_head()
    engine.dispose()


@pytest.mark.slow
def test_alembic_from_repository_root_without_pythonpath(empty_db_url: URL) -> None:
    env = _libpq_env(empty_db_url)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", "packages/common/alembic.ini", "upgrade", "head"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_offline_sql_needs_no_database() -> None:
    env = _libpq_env(
        URL.create("postgresql", host="nowhere.invalid", port=1, username="u", database="x")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "001_job_ledger_init:3af4686817cc", "--sql"],
        cwd=COMMON,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "CREATE TYPE job_status AS ENUM" in proc.stdout
    assert "UPDATE heimdex_private.alembic_version SET version_num='3af4686817cc'" in proc.stdout


@pytest.mark.slow
def test_plain_alembic_logs_like_every_heimdex_process() -> None:
    """env.py sets up logging with heimdex.logs (JSON lines off a terminal), keeping
    alembic's per-revision lines: plain alembic has no lines of ours in their place."""
    env = {**_libpq_env(URL.create("postgresql", host="nowhere.invalid")), "HEIMDEX_ENV": "prod"}
    env.pop("HEIMDEX_JWT_SECRET", None)  # settings that do not load: the defaults apply
    proc = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "001_job_ledger_init:3af4686817cc", "--sql"],
        cwd=COMMON,
        env={k: v for k, v in env.items() if k not in ("HEIMDEX_LOG_FORMAT", "HEIMDEX_LOG_LEVEL")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert {line["process"] for line in lines} == {"alembic"}
    assert any(line["msg"].startswith("Running upgrade 001_job_ledger_init") for line in lines)


def test_invalid_database_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://u:pw@h/db")
    with pytest.raises(HeimdexError, match="must point at PostgreSQL"):
        _ = Settings().sqlalchemy_url
