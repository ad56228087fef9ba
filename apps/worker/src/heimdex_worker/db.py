"""The worker's database access: each thread's own autocommit connection, and retrying a write
through an outage."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from heimdex.db import database_problem

logger = logging.getLogger(__name__)

MAX_RETRY_WAIT_SECONDS = 2.0


def failure_fields(exc: BaseException) -> dict[str, str]:
    """Log fields of a failed statement: the driver's error, and its cause as the API names it
    (`heimdex.db.database_problem`: unreachable, disk full, out of connections, the pooler...)."""
    found = database_problem(exc)
    fields = {"error": type(exc).__name__}
    if found is not None:
        fields["cause"] = type(found).__name__
        fields["reason"] = found.reason
    return fields


class ThreadConnections:
    """One autocommit connection per thread, over `engine`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._local = threading.local()

    @contextlib.contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """This thread's own connection, each statement its own transaction. Kept for the
        thread's life (no pool checkout per statement); dropped after a database error, so
        the next use connects again."""
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.invalidated:
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._local.conn = conn
        try:
            yield conn
        except DBAPIError:
            self._local.conn = None
            conn.close()
            raise

    def close(self) -> None:
        """Close this thread's connection (a thread ending gives it back to the pool)."""
        conn: Connection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None and not conn.closed:
            conn.close()


def retrying(
    what: str, fn: Callable[[], Any], *, give_up: Callable[[], bool] = lambda: False
) -> Any:
    """Run `fn` until it succeeds; database errors are logged once and retried with backoff."""
    wait = 0.05
    failing = False
    while True:
        try:
            value = fn()
        except DBAPIError as exc:
            if not failing:
                logger.warning(
                    f"{what} failed; retrying",
                    extra={"action": "worker.db_retry", "what": what, **failure_fields(exc)},
                )
                failing = True
            if give_up():
                raise
            time.sleep(wait)
            wait = min(wait * 2, MAX_RETRY_WAIT_SECONDS)
            continue
        if failing:
            logger.info(f"{what} works again", extra={"action": "worker.db_recovered"})
        return value
