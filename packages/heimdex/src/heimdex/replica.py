"""Reads that accept lag (operator lists, stats, failures, the queue gauges) on a streaming
replica, with the primary as the fallback while the replica lags or does not answer."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import Connection, Engine, text

from heimdex.db import make_engine
from heimdex.settings import Settings

logger = logging.getLogger(__name__)

CHECK_EVERY_SECONDS = 5.0

# Zero when the replica has replayed all it received; else the age of the last transaction it
# replayed (`now()` on an idle primary's replica would otherwise read as lag), or of its start
# when it has replayed none since. A server not in recovery (a URL that points at a primary)
# has no lag.
LAG = text(
    """
    SELECT CASE
             WHEN NOT pg_is_in_recovery() THEN 0
             WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
             ELSE extract(epoch FROM now() - coalesce(pg_last_xact_replay_timestamp(),
                                                      pg_postmaster_start_time()))
           END
    """
)


def replica_lag(conn: Connection) -> float:
    """Seconds the server of `conn` is behind its primary (0 for a primary)."""
    return float(conn.execute(LAG).scalar_one())


class ReadEngines:
    """The engine for reads that accept lag: the replica while it answers and is at most
    `max_lag_seconds` behind, else the primary. Checked at most every `check_every` seconds;
    each switch is logged once."""

    def __init__(
        self,
        primary: Engine,
        replica: Engine | None,
        *,
        max_lag_seconds: float,
        check_every: float = CHECK_EVERY_SECONDS,
    ) -> None:
        self.primary = primary
        self.replica = replica
        self.max_lag_seconds = max_lag_seconds
        self.check_every = check_every
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._use_replica = replica is not None
        self.lag: float | None = None
        """The replica's lag at the last check; None without a replica or when it failed."""

    def engine(self) -> Engine:
        if self.replica is None:
            return self.primary
        with self._lock:
            now = time.monotonic()
            if self._checked_at is None or now - self._checked_at >= self.check_every:
                self._checked_at = now
                self._check(self.replica)
            return self.replica if self._use_replica else self.primary

    def connect(self) -> Connection:
        """A connection for reads that accept lag (see `engine`)."""
        return self.engine().connect()

    def _check(self, replica: Engine) -> None:
        reason: str | None
        try:
            with replica.connect() as conn:
                self.lag = replica_lag(conn)
        except Exception as exc:  # any failure to read the lag: the replica is not usable
            self.lag = None
            reason = f"replica unreachable ({type(exc).__name__})"
        else:
            too_far = self.lag > self.max_lag_seconds
            reason = f"replica {self.lag:.1f}s behind" if too_far else None
        if reason is not None and self._use_replica:
            logger.warning(
                f"{reason}; reads go to the primary",
                extra={"action": "replica.fallback", "lag_seconds": self.lag},
            )
        elif reason is None and not self._use_replica:
            logger.info(
                "replica caught up; reads go to it again",
                extra={"action": "replica.restored", "lag_seconds": self.lag},
            )
        self._use_replica = reason is None

    def dispose(self) -> None:
        if self.replica is not None:
            self.replica.dispose()


def make_read_engines(settings: Settings, primary: Engine, **pool: object) -> ReadEngines:
    """The `ReadEngines` of `settings`: a replica engine (with `pool`) when
    `HEIMDEX_READ_DATABASE_URL` is set."""
    url = settings.read_sqlalchemy_url
    replica = make_engine(url, pool_mode=settings.pool_mode_of(url), **pool) if url else None
    return ReadEngines(primary, replica, max_lag_seconds=settings.read_max_lag_seconds)
