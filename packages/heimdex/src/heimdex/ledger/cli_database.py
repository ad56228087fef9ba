"""The database of a `heimdex jobs` command, and the one place where its failures to use it
(unreachable, login refused, missing, no schema, no privilege) become one line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from heimdex.db import database_error, make_engine
from heimdex.errors import HeimdexError
from heimdex.replica import make_read_engines
from heimdex.settings import (
    PoolMode,
    describe_url,
    detect_pool_mode,
    load_settings,
    normalize_url,
)

URL_KEY = "heimdex.jobs.database_url"
URL_HELP = "Database URL (default: DATABASE_URL or PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE)."


def note_url(ctx: click.Context, url: str | None) -> None:
    """Remember a `--database-url` given to the group or to a command (the command's wins)."""
    if url is not None or URL_KEY not in ctx.find_root().meta:
        ctx.find_root().meta[URL_KEY] = url


def command_url(ctx: click.Context, *, session: bool = False) -> URL:
    """The database of this invocation: `--database-url`, else the settings'; for a command
    that needs a `session`, the settings' `HEIMDEX_SESSION_DATABASE_URL` when `DATABASE_URL` is
    a transaction pooler's."""
    given = ctx.find_root().meta.get(URL_KEY)
    if given:
        return normalize_url(given)
    settings = load_settings()
    return (settings.session_url if session else None) or settings.sqlalchemy_url


def _pool_mode(url: URL) -> PoolMode:
    try:
        return load_settings().pool_mode_of(url)
    except HeimdexError:
        return detect_pool_mode(url)


@contextmanager
def command_engine(ctx: click.Context, *, session: bool = False) -> Iterator[Engine]:
    """An engine on the command's database. A command that needs a `session` (a session
    advisory lock, as `heimdex jobs prune` holds) refuses a transaction pooler's URL in one
    line: the lock would be taken on one server connection and released on another."""
    url = command_url(ctx, session=session)
    mode = _pool_mode(url)
    if session and mode is PoolMode.TRANSACTION:
        raise HeimdexError(
            f"{describe_url(url)} is a transaction pooler, and this command holds a session "
            "advisory lock: pass --database-url with a direct or session-mode URL, or set "
            "HEIMDEX_SESSION_DATABASE_URL; nothing was changed"
        )
    engine = make_engine(url, pool_mode=mode)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def read_engine(ctx: click.Context) -> Iterator[Engine]:
    """The engine of a read that accepts lag (list, stats, failures): the replica of
    `HEIMDEX_READ_DATABASE_URL` while it answers within its lag bound, else the primary; with
    `--database-url`, that database."""
    if ctx.find_root().meta.get(URL_KEY) is None:
        settings = load_settings()
        if settings.read_sqlalchemy_url is not None:
            primary = make_engine(settings.sqlalchemy_url, pool_mode=settings.pool_mode)
            reads = make_read_engines(settings, primary)
            try:
                yield reads.engine()
            finally:
                reads.dispose()
                primary.dispose()
            return
    with command_engine(ctx) as engine:
        yield engine


class JobsGroup(click.Group):
    """Turns a database the command could not use into a `HeimdexError` (one line, exit code
    1, printed by the root group); any other exception keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HeimdexError:
            raise
        except Exception as exc:
            error = _explained(ctx, exc)
            if error is None:
                raise
            raise error from None


def _explained(ctx: click.Context, exc: Exception) -> HeimdexError | None:
    try:
        url = command_url(ctx)
    except HeimdexError:
        return None
    return database_error(exc, url)
