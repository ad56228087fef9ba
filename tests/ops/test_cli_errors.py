"""Every `heimdex jobs` command meets a database it cannot use with one line and exit code 1:
unreachable, wrong password, missing database, a role without privileges. Never a traceback,
never the password."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from heimdex.cli import main
from heimdex_db.localpg import LocalPostgres, free_port
from tests.conftest import DatabaseFactory

PASSWORD = "s3cr3t-Pw%2F@x"  # a test role's; must never be echoed
JOB = str(uuid.uuid4())

COMMANDS = {
    "list": ["list"],
    "show": ["show", JOB],
    "stats": ["stats"],
    "failures": ["failures"],
    "retry": ["retry", JOB, "--reason", "upstream fixed"],
    "retry-bulk": ["retry", "--type", "noop", "--reason", "upstream fixed", "--yes"],
    "retry-dry-run": ["retry", "--type", "noop", "--reason", "upstream fixed", "--dry-run"],
    "cancel": ["cancel", JOB],
    "cancel-bulk": ["cancel", "--type", "noop", "--yes"],
    "requeue": ["requeue", JOB],
    "requeue-dry-run": ["requeue", "--type", "noop", "--dry-run"],
    "prune": ["prune"],
    "prune-dry-run": ["prune", "--dry-run"],
}


@dataclass(frozen=True)
class Case:
    url: URL
    expected: tuple[str, ...]  # what the one line names


@pytest.fixture(scope="module")
def password_cluster() -> Iterator[URL]:
    """A cluster of its own on which role `pw` must give its password (the shared clusters
    trust every local connection)."""
    with LocalPostgres.throwaway() as cluster:
        admin = create_engine(cluster.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("SET password_encryption = 'scram-sha-256'"))
            conn.execute(text(f"CREATE ROLE pw LOGIN PASSWORD '{PASSWORD}'"))
            hba_file = conn.execute(text("SHOW hba_file")).scalar_one()
            with open(hba_file, "r+") as hba:
                rules = hba.read()
                hba.seek(0)
                hba.write("host all pw 127.0.0.1/32 scram-sha-256\n" + rules)
            conn.execute(text("SELECT pg_reload_conf()"))
        admin.dispose()
        yield cluster.url().set(username="pw")


@pytest.fixture(scope="module")
def unprivileged(
    admin_engine: Engine, create_database: DatabaseFactory, head_template: str
) -> Iterator[URL]:
    """A database at head and a role that may connect to it and nothing more."""
    url = create_database(template=head_template)
    role = f"nopriv_{uuid.uuid4().hex[:8]}"
    with admin_engine.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'"))
        conn.execute(text(f'GRANT CONNECT ON DATABASE "{url.database}" TO {role}'))
    yield url.set(username=role, password=PASSWORD)
    with admin_engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
        conn.execute(text(f"DROP ROLE {role}"))


@pytest.fixture(
    params=[
        "unreachable",
        pytest.param("wrong-password", marks=pytest.mark.slow),  # a cluster of its own
        "missing-database",
        "no-privileges",
    ]
)
def case(request: pytest.FixtureRequest, pg_admin_url: URL) -> Case:
    if request.param == "unreachable":
        port = free_port()
        url = URL.create(
            "postgresql", "carol", PASSWORD, "127.0.0.1", port, "ledger"
        )  # nothing listens there
        return Case(url, (f"127.0.0.1:{port}/ledger", "carol", "refused"))
    if request.param == "wrong-password":
        url = request.getfixturevalue("password_cluster").set(password=PASSWORD + "-wrong")
        return Case(
            url, (f"{url.host}:{url.port}/{url.database}", "pw", "password authentication failed")
        )
    if request.param == "missing-database":
        name = f"nothing_{uuid.uuid4().hex[:8]}"
        url = pg_admin_url.set(database=name, password=PASSWORD)
        return Case(url, (f"{url.host}:{url.port}/{name}", f'database "{name}" does not exist'))
    url = request.getfixturevalue("unprivileged")
    return Case(
        url,
        (f"{url.host}:{url.port}/{url.database}", f"role {url.username}", "permission denied"),
    )


@pytest.fixture(autouse=True)
def _no_database_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("PG") or k == "DATABASE_URL"]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_jobs_command_reports_an_unusable_database_in_one_line(
    case: Case, command: str
) -> None:
    url = case.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(main, ["jobs", "--database-url", url, *COMMANDS[command]])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert PASSWORD not in result.output and "s3cr3t" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for part in case.expected:
        assert part in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.slow  # a real process
def test_the_newcomers_path_a_real_process_on_an_unreachable_default() -> None:
    """No DATABASE_URL, PGPORT where nothing listens: `python -m heimdex jobs stats`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    env.update(PGHOST="127.0.0.1", PGPORT=str(port), PGUSER="heimdex", PGPASSWORD=PASSWORD)
    proc = subprocess.run(
        [sys.executable, "-m", "heimdex", "jobs", "stats"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr and PASSWORD not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: cannot connect to PostgreSQL at 127.0.0.1:{port}/heimdex as heimdex: "
        "Connection refused"
    ]


def test_a_database_without_the_schema_says_to_migrate(
    empty_db_url: URL,
) -> None:
    url = empty_db_url.render_as_string(hide_password=False)
    result = CliRunner().invoke(main, ["jobs", "--database-url", url, "stats"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), result.exception
    (line,) = result.stderr.splitlines()
    assert "has no Heimdex schema" in line and "heimdex db upgrade" in line, line
