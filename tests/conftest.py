"""Fixtures shared by every test: a real PostgreSQL cluster and per-test databases."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from heimdex_common import localpg
from heimdex_common.db import make_engine
from heimdex_common.localpg import LocalPostgres
from heimdex_common.migrations.config import alembic_config
from heimdex_common.settings import normalize_url

TEMPLATE = "heimdex_template_head"
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[URL]:
    """A superuser URL of a throwaway cluster (or of `HEIMDEX_TEST_PG_URL` when set)."""
    given = os.environ.get("HEIMDEX_TEST_PG_URL")
    if given:
        yield normalize_url(given)
        return
    cluster = LocalPostgres.throwaway().start()
    try:
        yield cluster.url()
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def admin_engine(pg_admin_url: URL) -> Iterator[Engine]:
    engine = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


DatabaseFactory = Callable[..., URL]


@pytest.fixture(scope="session")
def create_database(admin_engine: Engine, pg_admin_url: URL) -> Iterator[DatabaseFactory]:
    """Creates databases (optionally from a template) and drops them at the session's end."""
    created: list[str] = []

    def factory(template: str | None = None, name: str | None = None) -> URL:
        name = name or f"t_{os.getpid()}_{next(_counter)}"
        with admin_engine.connect() as conn:
            localpg.create_database(conn, name, template=template)
        created.append(name)
        return pg_admin_url.set(database=name)

    yield factory
    with admin_engine.connect() as conn:
        for name in created:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def alembic_cfg(url: URL) -> Config:
    return alembic_config(database_url=url)


@pytest.fixture(scope="session")
def head_template(create_database: DatabaseFactory) -> str:
    """A database migrated to head once per session; tests clone it."""
    url = create_database(name=TEMPLATE)
    command.upgrade(alembic_cfg(url), "head")
    return TEMPLATE


@pytest.fixture
def empty_db_url(create_database: DatabaseFactory) -> URL:
    return create_database()


@pytest.fixture
def db_url(create_database: DatabaseFactory, head_template: str) -> URL:
    """A fresh database at Alembic head, private to this test."""
    return create_database(template=head_template)


@pytest.fixture
def engine(db_url: URL) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """A session whose work the test commits (or not) itself."""
    with Session(engine, expire_on_commit=False) as session:
        yield session


@pytest.fixture
def org_id() -> uuid.UUID:
    return uuid.uuid4()
