"""A database failure's problem type names its cause, from real server and pooler errors:
disk full, out of resources, no connection slot (PostgreSQL's or pgbouncer's), the pooler,
unreachable. Each is a 503 with Retry-After (retrying helps once the cause is gone)."""

from __future__ import annotations

import os
import pwd
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from heimdex.db import check_connection, database_problem, make_engine
from heimdex.errors import (
    DatabaseDiskFull,
    DatabaseOutOfResources,
    DatabasePoolerError,
    DatabaseTooManyConnections,
    DatabaseUnavailable,
)
from heimdex.settings import PoolMode, Settings
from heimdex_api import problems
from heimdex_api.app import create_app
from heimdex_db.localpg import free_port
from tests.pooler.conftest import PgbouncerFactory
from tests.stack import SECRET, auth

TYPE = problems.TYPE_BASE


def _plain(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _statement_app(engine: Engine, sql: str) -> TestClient:
    """An app with the API's error mapping and one route running `sql` on `engine`: a real
    server error raised the way a route's statement raises it."""
    app = FastAPI()
    problems.install(app)

    @app.get("/run")
    def run() -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql(sql)

    return TestClient(app, raise_server_exceptions=False)


def _assert_problem(resp: object, slug: str) -> None:
    status = getattr(resp, "status_code", None)
    body = resp.json()  # type: ignore[attr-defined]
    assert (status, body["type"]) == (503, TYPE + slug), body
    assert resp.headers["content-type"] == problems.MEDIA_TYPE  # type: ignore[attr-defined]
    assert resp.headers["retry-after"] == "1"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("errcode", "slug", "kind"),
    [
        ("disk_full", "database-disk-full", DatabaseDiskFull),
        ("out_of_memory", "database-out-of-resources", DatabaseOutOfResources),
        ("configuration_limit_exceeded", "database-out-of-resources", DatabaseOutOfResources),
        ("too_many_connections", "database-too-many-connections", DatabaseTooManyConnections),
    ],
)
def test_a_server_error_of_class_53_is_named_for_its_cause(
    engine: Engine, errcode: str, slug: str, kind: type[Exception]
) -> None:
    sql = f"DO $$BEGIN RAISE EXCEPTION 'provoked' USING ERRCODE = '{errcode}'; END$$"
    with pytest.raises(Exception) as caught, engine.begin() as conn:
        conn.exec_driver_sql(sql)
    assert isinstance(database_problem(caught.value), kind)
    _assert_problem(_statement_app(engine, sql).get("/run"), slug)


@pytest.fixture
def tiny_tablespace(admin_engine: Engine) -> Iterator[str]:
    """A tablespace on a 1 MiB tmpfs (root only: it mounts one)."""
    directory = Path(tempfile.mkdtemp(prefix="heimdex-full-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        directory.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    name = f"tiny_{uuid.uuid4().hex[:8]}"
    try:
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        with admin_engine.connect() as conn:
            conn.exec_driver_sql(f"CREATE TABLESPACE {name} LOCATION '{directory}'")
        yield name
    finally:
        with admin_engine.connect() as conn:
            conn.exec_driver_sql(f"DROP TABLESPACE IF EXISTS {name}")
        subprocess.run(["umount", str(directory)], check=True)
        directory.rmdir()


@pytest.mark.slow  # a tablespace on a tiny disk, or pgbouncer
def test_a_full_disk_is_a_disk_full_problem(engine: Engine, tiny_tablespace: str) -> None:
    """A real full disk: a table on a 1 MiB tmpfs, filled by one INSERT."""
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE filler (x text) TABLESPACE {tiny_tablespace}")
    sql = "INSERT INTO filler SELECT md5(g::text) FROM generate_series(1, 100000) AS g"
    try:
        _assert_problem(_statement_app(engine, sql).get("/run"), "database-disk-full")
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE filler")


def _api(url: URL, **env: str) -> TestClient:
    settings = Settings.model_validate(
        {"DATABASE_URL": url.render_as_string(hide_password=False),
         "HEIMDEX_JWT_SECRET": SECRET, **env}
    )  # fmt: skip
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.mark.slow  # a tablespace on a tiny disk, or pgbouncer
def test_pgbouncers_client_limit_is_a_too_many_connections_problem(
    pgbouncer: PgbouncerFactory, db_url: URL
) -> None:
    bouncer = pgbouncer(max_client_conn=2)
    url = bouncer.url(db_url.database or "")
    holders = [psycopg.connect(_plain(url)) for _ in range(2)]
    try:
        with _api(url) as client:
            resp = client.get("/jobs", headers=auth(uuid.uuid4()))
        _assert_problem(resp, "database-too-many-connections")
        with pytest.raises(DatabaseTooManyConnections):
            check_connection(make_engine(url))
    finally:
        for holder in holders:
            holder.close()


def test_a_full_connection_limit_of_postgresql_is_a_too_many_connections_problem(
    admin_engine: Engine, db_url: URL
) -> None:
    """53300 at connection time, which libpq reports without its SQLSTATE (a role's
    CONNECTION LIMIT: the same refusal as max_connections, without starving other tests)."""
    role = f"limited_{uuid.uuid4().hex[:8]}"
    with admin_engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
    try:
        with _api(db_url.set(username=role)) as client:
            resp = client.get("/jobs", headers=auth(uuid.uuid4()))
        _assert_problem(resp, "database-too-many-connections")
    finally:
        with admin_engine.connect() as conn:
            conn.exec_driver_sql(f"DROP ROLE {role}")


@pytest.mark.slow  # a tablespace on a tiny disk, or pgbouncer
def test_a_prepared_statement_another_client_made_is_a_pooler_problem(
    pgbouncer: PgbouncerFactory, db_url: URL
) -> None:
    """Through a transaction pooler with one server connection, two clients that prepare the
    same statement collide on psycopg's `_pg3_0` (42P05); one that prepared and finds
    another's server connection misses it (26000)."""
    bouncer = pgbouncer(pool_mode="transaction", default_pool_size=1)
    plain = _plain(bouncer.url(db_url.database or ""))
    with (
        psycopg.connect(plain, autocommit=True) as first,
        psycopg.connect(plain, autocommit=True) as second,
    ):
        first.execute("SELECT 1", prepare=True)
        with pytest.raises(psycopg.Error) as caught:
            second.execute("SELECT 1", prepare=True)
    assert caught.value.sqlstate == "42P05"
    found = database_problem(caught.value)
    assert isinstance(found, DatabasePoolerError)
    assert "HEIMDEX_DB_POOL_MODE=transaction" in str(found)

    # The same collision through the API's mapping, on an engine that prepares (declared
    # direct while it is not): `_pg3_0` of the first client is still on the server connection.
    engine = make_engine(bouncer.url(db_url.database or ""), pool_mode=PoolMode.DIRECT)
    app = FastAPI()
    problems.install(app)

    @app.get("/run")
    def run() -> None:
        with engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert driver is not None
            driver.execute("SELECT 3", prepare=True)

    with TestClient(app, raise_server_exceptions=False) as client:
        _assert_problem(client.get("/run"), "database-pooler-error")
    engine.dispose()


def test_an_unreachable_server_is_still_database_unavailable() -> None:
    url = URL.create("postgresql+psycopg", username="u", host="127.0.0.1", port=free_port(),
                     database="ledger")  # fmt: skip
    with _api(url) as client:
        resp = client.get("/jobs", headers=auth(uuid.uuid4()))
    _assert_problem(resp, "database-unavailable")
    with pytest.raises(DatabaseUnavailable):
        check_connection(make_engine(url))
