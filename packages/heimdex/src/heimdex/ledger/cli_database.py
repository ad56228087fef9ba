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
from heimdex.settings import load_settings, normalize_url

URL_KEY = "heimdex.jobs.database_url"
URL_HELP = "Database URL (default: DATABASE_URL or PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE)."


def note_url(ctx: click.Context, url: str | None) -> None:
    """Remember a `--database-url` given to the group or to a command (the command's wins)."""
    if url is not None or URL_KEY not in ctx.find_root().meta:
        ctx.find_root().meta[URL_KEY] = url


def command_url(ctx: click.Context) -> URL:
    """The database of this invocation: `--database-url`, else the settings'."""
    given = ctx.find_root().meta.get(URL_KEY)
    return normalize_url(given) if given else load_settings().sqlalchemy_url


@contextmanager
def command_engine(ctx: click.Context) -> Iterator[Engine]:
    engine = make_engine(command_url(ctx))
    try:
        yield engine
    finally:
        engine.dispose()


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
