"""alembic_version out of `public`; roles the history needs; a clean downgrade."""

from __future__ import annotations

from functools import cache

import pytest
from alembic import command
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from heimdex_db.config import alembic_config, script_directory
from heimdex_db.localpg import LocalPostgres, create_database
from tests.dbutil import execute, scalar
from tests.security.conftest import apply_sql_file, offline_sql

RLS_REVISION = "7e5b3c8d1f20"


@cache
def before_rls() -> str:
    rls = script_directory(alembic_config()).get_revision(RLS_REVISION)
    assert rls is not None
    assert isinstance(rls.down_revision, str)
    return rls.down_revision


ORG = "11111111-1111-1111-1111-111111111111"


def _database_of_the_old_toolchain(url: URL) -> None:
    """At before_rls() with the version table in `public`, as the previous env.py left it."""
    command.upgrade(alembic_config(database_url=url), before_rls())
    execute(
        url,
        "ALTER TABLE heimdex_private.alembic_version SET SCHEMA public",
        "DROP SCHEMA heimdex_private",
        f"INSERT INTO job (org_id, type) VALUES ('{ORG}', 'kept')",
    )


@pytest.fixture
def old_db_url(empty_db_url: URL) -> URL:
    _database_of_the_old_toolchain(empty_db_url)
    return empty_db_url


def _assert_moved_to(url: URL, revision: str) -> None:
    assert scalar(url, "SELECT to_regclass('public.alembic_version')") is None
    assert scalar(url, "SELECT version_num FROM heimdex_private.alembic_version") == revision
    assert scalar(url, "SELECT count(*) FROM heimdex_private.alembic_version") == 1
    assert scalar(url, f"SELECT type FROM job WHERE org_id = '{ORG}'") == "kept"


def test_upgrade_moves_a_public_version_table_keeping_its_revision(old_db_url: URL) -> None:
    command.upgrade(alembic_config(database_url=old_db_url), "head")
    head = script_directory(alembic_config()).get_current_head()
    assert head is not None
    _assert_moved_to(old_db_url, head)


@pytest.mark.slow
def test_the_artifact_alone_moves_a_public_version_table(old_db_url: URL) -> None:
    apply_sql_file(old_db_url, offline_sql(before_rls(), RLS_REVISION))
    _assert_moved_to(old_db_url, RLS_REVISION)
    assert scalar(old_db_url, "SELECT relrowsecurity FROM pg_class WHERE relname = 'job'")


def test_two_version_tables_stop_the_upgrade_and_change_nothing(old_db_url: URL) -> None:
    execute(
        old_db_url,
        "CREATE SCHEMA heimdex_private",
        "CREATE TABLE heimdex_private.alembic_version (version_num varchar(32) PRIMARY KEY)",
        "INSERT INTO heimdex_private.alembic_version VALUES ('001_job_ledger_init')",
    )
    with pytest.raises(DBAPIError, match=r"both public\.alembic_version and heimdex_private"):
        command.upgrade(alembic_config(database_url=old_db_url), "head")
    assert scalar(old_db_url, "SELECT version_num FROM public.alembic_version") == before_rls()
    assert scalar(old_db_url, "SELECT relrowsecurity FROM pg_class WHERE relname = 'job'") is False


def test_downgrade_takes_back_policies_grants_and_the_claim_function(
    db_url: URL, admin_engine: Engine
) -> None:
    command.downgrade(alembic_config(database_url=db_url), before_rls())
    checks = {
        "policies": "SELECT count(*) FROM pg_policies WHERE schemaname = 'public'",
        # job_outbox keeps the RLS its own revision enabled.
        "rls": "SELECT count(*) FROM pg_class"
        " WHERE relrowsecurity AND relname IN ('job', 'job_event')",
        "grants": "SELECT count(*) FROM information_schema.role_table_grants"
        " WHERE table_schema = 'public'"
        " AND grantee IN ('anon', 'authenticated', 'service_role')",
        "column grants": "SELECT count(*) FROM information_schema.column_privileges"
        " WHERE table_schema = 'public' AND grantee = 'authenticated'",
        "function": "SELECT count(*) FROM pg_proc WHERE proname = 'current_org_id'",
        "schema usage": "SELECT count(*) FROM pg_roles"
        " WHERE rolname = 'authenticated'"
        " AND has_schema_privilege(oid, 'heimdex_private', 'USAGE')",
    }
    left = {name: scalar(db_url, sql) for name, sql in checks.items()}
    assert left == dict.fromkeys(checks, 0)
    # Roles are the cluster's: other databases use them, the downgrade leaves them.
    with admin_engine.connect() as conn:
        roles = conn.execute(
            text(
                "SELECT count(*) FROM pg_roles"
                " WHERE rolname IN ('anon', 'authenticated', 'service_role')"
            )
        ).scalar()
    assert roles == 3
    assert scalar(db_url, "SELECT version_num FROM heimdex_private.alembic_version") == before_rls()


@pytest.mark.slow
def test_missing_roles_and_no_right_to_create_them_is_a_clear_error() -> None:
    """A fresh cluster (roles are cluster-wide) and a migrating user without CREATEROLE."""
    with LocalPostgres.throwaway() as cluster:
        admin = create_engine(cluster.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("CREATE ROLE app LOGIN"))
            create_database(conn, "appdb", owner="app")
        url = cluster.url("appdb").set(username="app")
        with pytest.raises(DBAPIError) as exc:
            command.upgrade(alembic_config(database_url=url), "head")
        assert "role anon does not exist and app may not create it" in str(exc.value)
        assert scalar(url, "SELECT version_num FROM heimdex_private.alembic_version") == (
            before_rls()
        )
        assert scalar(url, "SELECT count(*) FROM pg_proc WHERE proname = 'current_org_id'") == 0

        with admin.connect() as conn:
            conn.execute(text("CREATE ROLE anon NOLOGIN"))
            conn.execute(text("CREATE ROLE authenticated NOLOGIN"))
            conn.execute(text("CREATE ROLE service_role NOLOGIN"))
        # Pre-created by an operator (or Supabase): the same history goes through.
        command.upgrade(alembic_config(database_url=url), "head")
        head = script_directory(alembic_config()).get_current_head()
        assert scalar(url, "SELECT version_num FROM heimdex_private.alembic_version") == head
        admin.dispose()


@pytest.mark.slow
def test_offline_sql_starts_by_securing_the_version_table() -> None:
    sql = offline_sql(before_rls(), RLS_REVISION)
    prelude, _, rest = sql.partition("BEGIN;")
    assert "ALTER TABLE public.alembic_version SET SCHEMA heimdex_private" in prelude
    assert "UPDATE heimdex_private.alembic_version SET version_num='7e5b3c8d1f20'" in rest
    assert " alembic_version" not in rest.replace("heimdex_private.alembic_version", "")
