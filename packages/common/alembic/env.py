"""Alembic environment: the database comes from `heimdex db` or the settings, never the ini."""

from __future__ import annotations

import contextlib

from alembic import context
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, pool
from sqlalchemy.exc import OperationalError

from heimdex.db import connection_error, make_engine
from heimdex.errors import HeimdexError
from heimdex.logs import configure_logging
from heimdex.models import Base
from heimdex.settings import load_settings, log_options_or_defaults, normalize_url
from heimdex_db.autogen import rewriter as enum_change_around_default
from heimdex_db.config import VERSION_TABLE_OPTIONS, VERSION_TABLE_PRELUDE

# Enum create/drop and VARCHAR -> enum with USING in autogenerate (the tooling extra; an
# image without it never autogenerates).
with contextlib.suppress(ImportError):
    import alembic_postgresql_enum  # noqa: F401

config = context.config
target_metadata = Base.metadata

# Plain `alembic` (the playbook's commands) logs like every heimdex process; `heimdex db` and the
# tests configure logging themselves and say so (configure_logger False).
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    configure_logging("alembic", **log_options_or_defaults(), quiet_chatter=False)

COMMON_OPTIONS = {
    "target_metadata": target_metadata,
    # One transaction per revision: a failing revision leaves the database at the one before.
    "transaction_per_migration": True,
    "compare_type": True,
    **VERSION_TABLE_OPTIONS,
    "process_revision_directives": enum_change_around_default,
}


def run_offline() -> None:
    # Offline output must not depend on any reachable (or configured) database.
    context.configure(dialect_name="postgresql", literal_binds=True, **COMMON_OPTIONS)
    # First in every compiled file, so an artifact applied to a database whose version table
    # is still in `public` moves it before it is read or written.
    context.execute(VERSION_TABLE_PRELUDE)
    with context.begin_transaction():
        context.run_migrations()


def prepare_version_table(connection: Connection) -> None:
    # Committed before alembic configures itself, so alembic still sees a connection of its own
    # (not an external transaction) and keeps one transaction per revision. A connection handed
    # over inside the caller's transaction stays in it: the caller owns that transaction.
    if connection.in_transaction():
        connection.exec_driver_sql(VERSION_TABLE_PRELUDE)
    else:
        with connection.begin():
            connection.exec_driver_sql(VERSION_TABLE_PRELUDE)


def run_with(connection: Connection) -> None:
    prepare_version_table(connection)
    context.configure(connection=connection, **COMMON_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    given = config.attributes.get("connection")
    if isinstance(given, Engine):
        # What pytest-alembic (and other tools) hand over: an Engine, not a Connection. Ours
        # to connect, and to close.
        with given.connect() as connection:
            run_with(connection)
        return
    if given is not None:
        run_with(given)
        return
    try:
        url = config.attributes.get("database_url") or load_settings().sqlalchemy_url
        engine = make_engine(normalize_url(url), poolclass=pool.NullPool)
    except HeimdexError as exc:
        raise CommandError(str(exc)) from None
    try:
        connection = engine.connect()
    except OperationalError as exc:
        raise CommandError(str(connection_error(engine.url, exc))) from None
    with connection:
        run_with(connection)
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
