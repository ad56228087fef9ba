"""One-shot reads and writes of a test database by URL, for tests that work below the ORM."""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from heimdex_db.config import migration_context
from heimdex_db.verify.schema import Snapshot, snapshot


def scalar(url: URL, sql: str) -> object:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar()
    finally:
        engine.dispose()


def execute(url: URL, *statements: str) -> None:
    """Run `statements` in one transaction, as written (no bind parameters)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def version_of(url: URL) -> str | None:
    """The revision the database is stamped with, read where the tool keeps it."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return migration_context(conn).get_current_revision()
    finally:
        engine.dispose()


def schema_of(url: URL) -> Snapshot:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return snapshot(conn)
    finally:
        engine.dispose()
