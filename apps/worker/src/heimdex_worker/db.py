"""The worker's database access: lanes of a few shared autocommit connections, and retrying a
write through an outage."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Budget:
    """How a worker spends its `HEIMDEX_WORKER_DB_CONNECTIONS`: one each for the LISTEN
    connection, the keeper, the outcome writer (one writer at a time) and what uses the engine
    directly (metrics scrapes, a retention slice); the rest between claims (as many as the
    runners keep in flight, up to half of the rest), the handlers' own connections
    (`ctx.connect()`, a third of what is left) and the attempts' writes (a start, stages and
    checkpoints, placement)."""

    total: int
    claims: int
    attempts: int
    handlers: int

    @classmethod
    def of(cls, total: int, *, concurrency: int, batch: int) -> Budget:
        shared = total - 4
        # Claims in flight at once: one per batch of runners, plus one ahead (batch 1 at
        # concurrency 4: four; batch 10: two). Every idle runner claiming at once would split
        # a batch between them and send more, emptier claims.
        wanted = min(concurrency, -(-concurrency // batch) + 1)
        claims = max(1, min(wanted, shared // 2))
        rest = shared - claims
        handlers = max(1, rest // 3)
        return cls(total=total, claims=claims, attempts=rest - handlers, handlers=handlers)

    @property
    def pool_size(self) -> int:
        """The engine's connections: all but the LISTEN one."""
        return self.total - 1


class Lanes:
    """The worker's lanes over one engine (`Budget`)."""

    def __init__(self, engine: Engine, budget: Budget) -> None:
        self.claims = Lane(engine, budget.claims)
        self.attempts = Lane(engine, budget.attempts)
        self.handlers = Lane(engine, budget.handlers)
        self.outcomes = Lane(engine, 1)
        self.keeper = Lane(engine, 1)

    def close(self) -> None:
        for lane in (self.claims, self.attempts, self.handlers, self.outcomes, self.keeper):
            lane.close()


class Lane:
    """Up to `size` autocommit connections over `engine`, shared by the threads of one use of
    the worker (claims, outcomes, the keeper, the attempts' own writes). A thread takes one for
    a statement and gives it back, so a lane's connections stay few whatever the number of
    threads, and one use waiting for its connections never holds up another's."""

    def __init__(self, engine: Engine, size: int) -> None:
        self.engine = engine
        self.size = size
        self._free = threading.BoundedSemaphore(size)
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextlib.contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A connection of the lane, each statement its own transaction; waits while all are
        in use. Dropped after a database error, so the next use connects again."""
        with self._free:
            conn = self._take()
            try:
                yield conn
            except DBAPIError:
                conn.close()
                raise
            except BaseException:
                self._give_back(conn)
                raise
            self._give_back(conn)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection of the lane inside one transaction (committed at the end, rolled back
        on an exception)."""
        with self.session() as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def session(self) -> Iterator[Connection]:
        """A connection of the lane in the engine's isolation level, whose transactions the
        caller owns; one it leaves open is rolled back."""
        with self.autocommit() as conn:
            if conn.in_transaction():  # begun by an autocommit statement: nothing server-side
                conn.commit()
            conn.execution_options(isolation_level=self.engine.dialect.default_isolation_level)
            try:
                yield conn
            finally:
                if not (conn.closed or conn.invalidated):
                    if conn.in_transaction():
                        conn.rollback()
                    conn.execution_options(isolation_level="AUTOCOMMIT")

    def _take(self) -> Connection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not (conn.closed or conn.invalidated):
                    return conn
        return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def _give_back(self, conn: Connection) -> None:
        with self._lock:
            if not (self._closed or conn.closed or conn.invalidated):
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the idle connections (those in use are closed as they come back)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
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
