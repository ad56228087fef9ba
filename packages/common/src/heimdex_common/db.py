"""Engine and session factories. Entrypoints build them; nothing connects at import."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from heimdex_common.errors import DatabaseUnavailable
from heimdex_common.settings import describe_url, normalize_url


def make_engine(url: URL | str, **kwargs: object) -> Engine:
    """An engine for `url` (pinned to psycopg 3). Connects lazily.

    No pre-ping: it costs a round trip on every checkout of the hot paths. A connection broken
    by a restart fails its next statement instead, SQLAlchemy drops the pool's connections from
    before the failure, and the callers (API error mapping, worker loops) retry on a new one.
    """
    return create_engine(normalize_url(url), **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def connection_error(url: URL, exc: BaseException) -> DatabaseUnavailable:
    """One line naming host, port, database and the driver's reason; never the password."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    first = reason[0] if reason else type(exc).__name__
    if url.password:
        first = first.replace(str(url.password), "***")
    return DatabaseUnavailable(f"cannot connect to PostgreSQL at {describe_url(url)}: {first}")


def check_connection(engine: Engine) -> None:
    """Raise `DatabaseUnavailable` with a readable reason unless `SELECT 1` succeeds."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        raise connection_error(engine.url, exc) from None


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error.

    The caller owns this: repositories inside only add, flush and query.
    """
    with factory() as session, session.begin():
        yield session
