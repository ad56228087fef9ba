"""The revision graph and the database's place in it: no DDL here, only reading."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.runtime.environment import EnvironmentContext
from alembic.script import Script, ScriptDirectory
from alembic.script.revision import MultipleHeads, ResolutionError
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, pool
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError

from heimdex.db import connection_error, make_engine
from heimdex.errors import HeimdexError
from heimdex_db.config import script_directory

T = TypeVar("T")


def scripts_of(cfg: Config) -> ScriptDirectory:
    try:
        return script_directory(cfg)
    except CommandError as exc:
        raise HeimdexError(f"cannot read the revision history: {exc}") from None


def ordered_revisions(scripts: ScriptDirectory) -> list[Script]:
    """Every revision from base to head, oldest first (the single-head history)."""
    heads = scripts.get_heads()
    if len(heads) > 1:
        raise HeimdexError(
            f"the history has {len(heads)} heads ({', '.join(sorted(heads))}): "
            "merge them with `alembic merge heads`"
        )
    try:
        return list(reversed(list(scripts.walk_revisions())))
    except CommandError as exc:
        raise HeimdexError(f"cannot walk the revision history: {exc}") from None


def resolve_revision(
    scripts: ScriptDirectory, given: str, *, also: str = "head, base"
) -> Script | None:
    """The revision `given` names, as Alembic reads it: an id, a unique prefix of one, `head`
    (`heads`) or `base` (None). `also` lists, in the error, the other forms the caller takes.

    Relative targets (`+1`, `-2`) are not ids: `migrate` counts them from where the database is.
    """

    def known() -> str:
        return ", ".join(s.revision for s in reversed(list(scripts.walk_revisions())))

    if not given.strip():
        raise HeimdexError(f"an empty revision names nothing (known: {known()}, {also})")
    try:
        found = scripts.revision_map.get_revision(given)
    except MultipleHeads as exc:
        raise HeimdexError(
            f"{given!r} names several heads ({', '.join(exc.heads)}): name one of them, or "
            "merge them with `alembic merge heads`"
        ) from None
    except ResolutionError as exc:
        problem = (
            "is ambiguous"
            if str(exc).startswith("Multiple revisions")
            else "is not a revision of this history"
        )
        raise HeimdexError(f"{given!r} {problem} ({exc}; known: {known()}, {also})") from None
    return found if isinstance(found, Script) else None


def engine_for(url: URL) -> Engine:
    return make_engine(url, poolclass=pool.NullPool)


@contextmanager
def connect(url: URL) -> Iterator[Connection]:
    engine = engine_for(url)
    try:
        try:
            conn = engine.connect()
        except OperationalError as exc:
            raise connection_error(url, exc) from None
        with conn:
            yield conn
    finally:
        engine.dispose()


def inspect_with_env(cfg: Config, conn: Connection, fn: Callable[[MigrationContext], T]) -> T:
    """Run env.py on `conn` without migrating and call `fn` with its `MigrationContext`.

    Going through env.py means whatever it configures (version table and its schema, compare
    options, target metadata) is what we read, for this history or a copy of it.
    """
    scripts = scripts_of(cfg)
    found: list[T] = []

    def capture(rev: object, context: MigrationContext) -> list[object]:
        found.append(fn(context))
        return []

    cfg.attributes["connection"] = conn
    try:
        with EnvironmentContext(cfg, scripts, fn=capture):
            scripts.run_env()
    except CommandError as exc:
        raise HeimdexError(str(exc)) from None
    finally:
        cfg.attributes.pop("connection", None)
        if conn.in_transaction():
            conn.rollback()
    return found[0]


def current_revisions(cfg: Config, conn: Connection) -> tuple[str, ...]:
    """The revisions stamped in the version table (empty for a fresh database)."""
    return inspect_with_env(cfg, conn, lambda ctx: tuple(ctx.get_current_heads()))
