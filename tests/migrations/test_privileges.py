"""`heimdex db upgrade` as a role without the privileges it needs: one line, exit code 1."""

from __future__ import annotations

import uuid

from click.testing import CliRunner
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from heimdex_common.cli import main as cli


def test_upgrade_without_privileges_names_role_object_and_grant(
    admin_engine: Engine, empty_db_url: URL
) -> None:
    role = f"weak_{uuid.uuid4().hex[:8]}"
    with admin_engine.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD 'weak-pw'"))
        conn.execute(text(f'GRANT CONNECT ON DATABASE "{empty_db_url.database}" TO {role}'))
    try:
        url = empty_db_url.set(username=role, password="weak-pw")
        result = CliRunner().invoke(
            cli, ["db", "upgrade", "--database-url", url.render_as_string(hide_password=False)]
        )
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert "Traceback" not in result.output
        assert (
            f"role {role}: permission denied for database {empty_db_url.database};" in lines[0]
        ), lines[0]
        assert "missing grant: GRANT CONNECT, CREATE ON DATABASE " in lines[0]
        assert "weak-pw" not in result.output
    finally:
        with admin_engine.connect() as conn:
            conn.execute(text(f'REVOKE ALL ON DATABASE "{empty_db_url.database}" FROM {role}'))
            conn.execute(text(f"DROP ROLE {role}"))


def test_a_revision_refused_for_privileges_names_role_schema_and_grant(
    admin_engine: Engine, empty_db_url: URL
) -> None:
    role = f"weak_{uuid.uuid4().hex[:8]}"
    with admin_engine.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD 'weak-pw'"))
        conn.execute(text(f'GRANT CONNECT, CREATE ON DATABASE "{empty_db_url.database}" TO {role}'))
    try:
        url = empty_db_url.set(username=role, password="weak-pw")
        result = CliRunner().invoke(
            cli, ["db", "upgrade", "--database-url", url.render_as_string(hide_password=False)]
        )
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, result.output
        assert f"role {role}: permission denied for schema " in errors[0], errors[0]
        assert "missing grant: GRANT USAGE, CREATE ON SCHEMA " in errors[0]
        assert f" TO {role}" in errors[0]
        assert "weak-pw" not in result.output
    finally:
        with admin_engine.connect() as conn:
            # What the role created (its schema) goes with the database.
            conn.execute(text(f'DROP DATABASE "{empty_db_url.database}" WITH (FORCE)'))
            conn.execute(text(f"DROP ROLE {role}"))


def test_upgrade_without_privileges_on_heimdex_private_names_that_schema(
    admin_engine: Engine, db_url: URL
) -> None:
    # The case: a database at head, a role that may connect but not reach the version
    # table's schema.
    role = f"weak_{uuid.uuid4().hex[:8]}"
    with admin_engine.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD 'weak-pw'"))
        conn.execute(text(f'GRANT CONNECT ON DATABASE "{db_url.database}" TO {role}'))
    try:
        url = db_url.set(username=role, password="weak-pw")
        result = CliRunner().invoke(
            cli, ["db", "upgrade", "--database-url", url.render_as_string(hide_password=False)]
        )
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output and "weak-pw" not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, result.output
        assert f"role {role}: permission denied for schema heimdex_private" in errors[0], errors
        assert f"ON SCHEMA heimdex_private TO {role}" in errors[0], errors
    finally:
        with admin_engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{db_url.database}" WITH (FORCE)'))
            conn.execute(text(f"DROP ROLE {role}"))
