"""`heimdex db upgrade` as a role without the privileges it needs: one line, exit code 1."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from heimdex.cli import main as cli

PASSWORD = "weak-pw"


@pytest.fixture
def weak_role(admin_engine: Engine) -> Iterator[Callable[[URL, str], str]]:
    """Creates a login role granted `grants` on the database of a URL; drops the database
    (with what the role created in it) and the role afterwards."""
    made: list[tuple[str, str]] = []

    def make(url: URL, grants: str) -> str:
        role = f"weak_{uuid.uuid4().hex[:8]}"
        with admin_engine.connect() as conn:
            conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'"))
            conn.execute(text(f'GRANT {grants} ON DATABASE "{url.database}" TO {role}'))
        made.append((role, str(url.database)))
        return role

    yield make
    with admin_engine.connect() as conn:
        for role, database in made:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            conn.execute(text(f"DROP ROLE {role}"))


def _upgrade_as(url: URL, role: str) -> tuple[Result, list[str]]:
    as_role = url.set(username=role, password=PASSWORD)
    result = CliRunner().invoke(
        cli, ["db", "upgrade", "--database-url", as_role.render_as_string(hide_password=False)]
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and PASSWORD not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return result, errors


def test_upgrade_without_privileges_names_role_object_and_grant(
    empty_db_url: URL, weak_role: Callable[[URL, str], str]
) -> None:
    role = weak_role(empty_db_url, "CONNECT")
    result, errors = _upgrade_as(empty_db_url, role)
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert f"role {role}: permission denied for database {empty_db_url.database};" in errors[0]
    assert "missing grant: GRANT CONNECT, CREATE ON DATABASE " in errors[0]


def test_a_revision_refused_for_privileges_names_role_schema_and_grant(
    empty_db_url: URL, weak_role: Callable[[URL, str], str]
) -> None:
    role = weak_role(empty_db_url, "CONNECT, CREATE")
    _, errors = _upgrade_as(empty_db_url, role)
    assert f"role {role}: permission denied for schema " in errors[0], errors[0]
    assert "missing grant: GRANT USAGE, CREATE ON SCHEMA " in errors[0]
    assert f" TO {role}" in errors[0]


def test_upgrade_without_privileges_on_heimdex_private_names_that_schema(
    db_url: URL, weak_role: Callable[[URL, str], str]
) -> None:
    # The case: a database at head, a role that may connect but not reach the version
    # table's schema.
    role = weak_role(db_url, "CONNECT")
    _, errors = _upgrade_as(db_url, role)
    assert f"role {role}: permission denied for schema heimdex_private" in errors[0], errors
    assert f"ON SCHEMA heimdex_private TO {role}" in errors[0], errors
