"""Fixtures shared by every test: a real PostgreSQL cluster and per-test databases.

Under pytest-xdist every worker process is a session of its own: it starts its own cluster (on a
free port, in a directory of its own) and builds its own template databases, so workers share no
server, database, port or file. With `HEIMDEX_TEST_PG_URL` they share that server; database names
carry the worker's id (`WORKER`) so they still do not collide.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from heimdex.db import make_engine
from heimdex.settings import normalize_url
from heimdex_db import localpg
from heimdex_db.config import alembic_config
from heimdex_db.localpg import LocalPostgres
from tests.xdist_groups import pytest_collection_modifyitems  # noqa: F401 - a hook, see there

# "gw0", "gw1", ... under pytest-xdist; "main" in a run without workers (-n 0, -p no:xdist).
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
TEMPLATE = f"heimdex_template_head_{WORKER}"
_counter = itertools.count()


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """With pytest-xdist disabled (`-p no:xdist`), accept and ignore the options pyproject's
    addopts passes it, so that a one-process run needs no other flag."""
    if pluginmanager.has_plugin("xdist"):
        return
    group = parser.getgroup("xdist (disabled)")
    # `_addoption`: lowercase short options are reserved to plugins (xdist registers it so).
    group._addoption("-n", "--numprocesses", dest="numprocesses", default=None)
    group.addoption("--maxprocesses", dest="maxprocesses", default=None)
    group.addoption("--dist", dest="dist", default="no")


# Markers of tests that take minutes: such a test runs only when `-m` names its marker.
OPT_IN = {
    "failover": "minutes against a pg_auto_failover formation: run with -m failover",
    "wallclock": "sleeps through real minutes: run with -m wallclock",
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    markexpr = item.config.option.markexpr or ""
    for marker, reason in OPT_IN.items():
        if item.get_closest_marker(marker) and marker not in markexpr:
            pytest.skip(reason)


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
        cluster.stop()
        # Deleted in the background: a session's databases are tens of thousands of files, and
        # on a disk mounted with `discard` deleting them took 20-90 s after the last test.
        subprocess.run(
            ["sh", "-c", 'rm -rf -- "$1" >/dev/null 2>&1 &', "sh", str(cluster.datadir.parent)],
            check=True,
        )


@pytest.fixture(scope="session")
def admin_engine(pg_admin_url: URL) -> Iterator[Engine]:
    engine = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


DatabaseFactory = Callable[..., URL]


@pytest.fixture(scope="session")
def create_database(admin_engine: Engine, pg_admin_url: URL) -> Iterator[DatabaseFactory]:
    """Creates databases (optionally from a template); at the session's end they go with the
    throwaway cluster, or are dropped one by one on a server of `HEIMDEX_TEST_PG_URL`."""
    created: list[str] = []

    def factory(template: str | None = None, name: str | None = None) -> URL:
        name = name or f"t_{WORKER}_{os.getpid()}_{next(_counter)}"
        with admin_engine.connect() as conn:
            localpg.create_database(conn, name, template=template)
        created.append(name)
        return pg_admin_url.set(database=name)

    yield factory
    if not os.environ.get("HEIMDEX_TEST_PG_URL"):
        return  # the throwaway cluster goes whole (pg_admin_url): no DROP one by one
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
