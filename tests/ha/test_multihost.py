"""Heimdex on a multi-host URL, as it reaches an HA cluster: two real servers, the first one
down or read-only (a demoted primary), the second the primary."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from heimdex.db import make_engine, server_address
from heimdex.ledger import repository
from heimdex.settings import Settings, describe_url, normalize_url
from heimdex_api.app import create_app
from heimdex_db import localpg
from heimdex_db.localpg import LocalPostgres
from heimdex_worker.listener import listen
from tests.conftest import DatabaseFactory
from tests.stack import FAST


@pytest.fixture(scope="module")
def other_server() -> Iterator[LocalPostgres]:
    """A second cluster: the node listed first, which stops being the primary."""
    cluster = LocalPostgres.throwaway().start()
    try:
        yield cluster
    finally:
        cluster.destroy()


def multi_host(first: str, second: URL) -> str:
    """libpq's multi-host form: `first` (host:port) tried before `second`'s server."""
    return (
        f"postgresql://postgres@{first},{second.host}:{second.port}/{second.database}"
        "?target_session_attrs=read-write&connect_timeout=3"
    )


@pytest.mark.slow  # a second cluster of its own
def test_read_only_server_is_left_for_the_new_primary(
    other_server: LocalPostgres, create_database: DatabaseFactory
) -> None:
    """A pooled connection to a primary that turns read-only fails its write once (25006),
    the pool drops it, and the next write finds the primary by target_session_attrs."""
    primary = create_database()
    name = primary.database
    assert name is not None
    other_server.create_database(name)
    for url in (primary, other_server.url(name)):
        setup = create_engine(url)
        with setup.begin() as conn:
            conn.execute(text("CREATE TABLE probe (n int)"))
        setup.dispose()
    engine = make_engine(multi_host(f"127.0.0.1:{other_server.port}", primary), pool_size=2)
    admin = create_engine(other_server.url(), isolation_level="AUTOCOMMIT")
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO probe VALUES (1)"))
            assert server_address(conn) == f"127.0.0.1:{other_server.port}"
        # What a demoted primary that kept its sessions does to them.
        with admin.connect() as conn:
            conn.execute(text("ALTER SYSTEM SET default_transaction_read_only = on"))
            conn.execute(text("SELECT pg_reload_conf()"))
        with pytest.raises(DBAPIError) as refused:
            for _ in range(5000):  # the reload reaches the session between two statements
                with engine.begin() as conn:
                    conn.execute(text("INSERT INTO probe VALUES (2)"))
        assert refused.value.connection_invalidated
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO probe VALUES (3)"))
            assert server_address(conn) == f"{primary.host}:{primary.port}"
        check = create_engine(primary)
        with check.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM probe WHERE n = 3")).scalar() == 1
        check.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text("ALTER SYSTEM RESET default_transaction_read_only"))
            conn.execute(text("SELECT pg_reload_conf()"))
        admin.dispose()
        engine.dispose()


def test_readyz_names_the_node_of_a_multi_host_url(
    db_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"127.0.0.1:{localpg.free_port()}"
    url = multi_host(dead, db_url)
    for key, value in {**FAST, "DATABASE_URL": url, "HEIMDEX_ENV": "local"}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert describe_url(settings.sqlalchemy_url) == (
        f"{dead},{db_url.host}:{db_url.port}/{db_url.database}"
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["node"] == f"{db_url.host}:{db_url.port}"


def test_listener_reaches_the_primary_of_a_multi_host_url(db_url: URL) -> None:
    url = normalize_url(multi_host(f"127.0.0.1:{localpg.free_port()}", db_url))
    finish, wake = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=listen, args=(url,), kwargs={"finish": finish, "wake": wake}, daemon=True
    )
    thread.start()
    try:
        assert wake.wait(30), "the listener never connected"  # it wakes once on connecting
        wake.clear()
        with psycopg.connect(db_url.set(drivername="postgresql").render_as_string(False)) as c:
            c.execute(f"NOTIFY {repository.NOTIFY_CHANNEL}, '{uuid.uuid4()}'")
        assert wake.wait(30), "a NOTIFY did not wake the worker"
    finally:
        finish.set()
        thread.join(timeout=10)
