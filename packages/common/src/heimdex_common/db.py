"""Engine and session factories. Entrypoints build them; nothing connects at import."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

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


def redact(message: str, password: str | None) -> str:
    """`message` without the password, its URL-encoded form or any piece of it longer than
    two characters (the pieces between `/`, `@`, `:` and `%` a misparsed URL could show)."""
    if not password:
        return message
    pieces = {password, quote(password, safe=""), quote(password)}
    pieces.update(p for p in re.split(r"[/@:%]", password) if len(p) > 2)
    for piece in sorted(pieces, key=len, reverse=True):
        message = message.replace(piece, "***")
    return message


def connection_error(url: URL, exc: BaseException) -> DatabaseUnavailable:
    """The one formatter for a failed connection: host, port, database and the driver's first
    line of reason; never the URL, the user's password or any part of it."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    first = reason[0] if reason else type(exc).__name__
    where = describe_url(url)
    password = None if url.password is None else str(url.password)
    return DatabaseUnavailable(
        redact(f"cannot connect to PostgreSQL at {where}: {first}", password)
    )


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
