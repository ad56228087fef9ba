"""Whether a database is at the head of the history this code ships: what the API checks.

Only Alembic's script directory and version table are read here, so a replica that imports this
loads none of the developer tooling (lint, artifacts, verify).
"""

from __future__ import annotations

from alembic.config import Config
from sqlalchemy import Connection

from heimdex_db.config import alembic_config, migration_context, script_directory


def head_revision(cfg: Config | None = None) -> str | None:
    """The head of the history (default: the repository's); None for an empty history."""
    return script_directory(cfg if cfg is not None else alembic_config()).get_current_head()


def known_revisions(cfg: Config | None = None) -> frozenset[str]:
    """Every revision of the history (default: the repository's)."""
    scripts = script_directory(cfg if cfg is not None else alembic_config())
    return frozenset(script.revision for script in scripts.walk_revisions())


def database_revision(conn: Connection) -> str | None:
    """The revision the database is stamped with (None: no revision, an empty database)."""
    return migration_context(conn).get_current_revision()


def schema_problem(
    conn: Connection, head: str | None, known: frozenset[str] = frozenset()
) -> str | None:
    """None when the database is at `head`, or ahead of it (at a revision not in `known`, the
    history this code ships); else one line saying where it is instead.

    Ahead is a newer release's expand revisions, applied while this release still serves during
    a rolling deploy (docs/migrations.md §6d); its contract revisions wait until this one is gone.
    """
    current = database_revision(conn)
    if current == head or (current is not None and known and current not in known):
        return None
    return f"at {current or 'no revision'}, expected {head}; run migrations"
