"""Serialising upgraders and failing fast behind long transactions."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from heimdex.errors import HeimdexError

logger = logging.getLogger(__name__)

# A fixed key: every `heimdex db upgrade/downgrade` of every replica takes the same lock.
# (Two 32-bit halves, "hdx" and "migrate", so it never collides with an application's own key.)
MIGRATION_LOCK = (0x68_64_78, 0x6D_69_67)
LOCK_NOT_AVAILABLE = "55P03"
LOCK_POLL_SECONDS = 0.2
# What a waiting upgrader shows in pg_stat_activity: its wait holds no lock to see in pg_locks.
WAITING_APPLICATION_NAME = "heimdex db: waiting for the migration lock"


class MigrationLockTimeout(HeimdexError):
    """Another upgrader held the migration lock for longer than we were willing to wait."""


def is_lock_timeout(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    return isinstance(exc, DBAPIError) and getattr(orig, "sqlstate", None) == LOCK_NOT_AVAILABLE


def lock_holder(conn: Connection) -> int | None:
    pid = conn.execute(
        text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = :a AND objid = :b AND objsubid = 2"
        ),
        {"a": MIGRATION_LOCK[0], "b": MIGRATION_LOCK[1]},
    ).scalar()
    return int(pid) if pid is not None else None


@contextmanager
def migration_lock(conn: Connection, *, wait_seconds: float) -> Iterator[None]:
    """Hold the session-level advisory lock on `conn` for the duration of the block.

    Waits at most `wait_seconds` for another holder (it is released when its session ends,
    crash included). `conn` is left outside any transaction.
    """
    params = {"a": MIGRATION_LOCK[0], "b": MIGRATION_LOCK[1]}

    def try_lock() -> bool:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:a, :b)"), params).scalar())
        conn.commit()
        return got

    if not try_lock():
        holder = lock_holder(conn)
        conn.execute(text(f"SET application_name = '{WAITING_APPLICATION_NAME}'"))
        conn.commit()
        logger.warning(
            "waiting up to %ss for the migration lock (held by backend pid %s)",
            wait_seconds,
            holder,
            extra={"action": "db.lock.wait", "holder_pid": holder},
        )
        started = time.monotonic()
        # Polled between transactions, never awaited inside one: a waiter holding a snapshot
        # would make the holder's CREATE INDEX CONCURRENTLY wait for it, and so for ever.
        while not try_lock():
            if time.monotonic() - started >= wait_seconds:
                raise MigrationLockTimeout(
                    f"another migration (backend pid {holder}) held the migration lock for more "
                    f"than {wait_seconds:g}s; try again later or raise --lock-wait"
                )
            time.sleep(LOCK_POLL_SECONDS)
        conn.execute(text("RESET application_name"))
        logger.info(
            "migration lock acquired after %.1fs",
            time.monotonic() - started,
            extra={"action": "db.lock.acquired"},
        )
    conn.commit()
    try:
        yield
    finally:
        if conn.in_transaction():
            conn.rollback()
        conn.execute(text("SELECT pg_advisory_unlock(:a, :b)"), params)
        conn.commit()
