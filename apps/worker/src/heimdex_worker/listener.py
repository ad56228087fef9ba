"""The listener thread: a LISTEN connection whose notifications wake idle runners. It needs a
session: behind a transaction pooler it connects to `HEIMDEX_SESSION_DATABASE_URL`, and without
one the worker polls (`runtime.Worker`)."""

from __future__ import annotations

import logging
import threading

import psycopg
from psycopg.conninfo import make_conninfo
from sqlalchemy.engine import URL

from heimdex.db import libpq_conninfo
from heimdex.ledger import repository
from heimdex_worker.db import MAX_RETRY_WAIT_SECONDS

logger = logging.getLogger(__name__)

# How a worker's connections show in pg_stat_activity.
APPLICATION_NAME = "heimdex-worker"


def listen(url: URL, *, finish: threading.Event, wake: threading.Event) -> None:
    """Set `wake` on every notification (and once on each connect) until `finish` is set;
    reconnect with backoff when the connection drops. `url` must reach a session (direct, or a
    session pooler): through a transaction pooler LISTEN lands on a server connection the
    pooler hands to other clients, and nothing is ever delivered."""
    conninfo = make_conninfo(libpq_conninfo(url), application_name=APPLICATION_NAME)
    wait = 0.1
    while not finish.is_set():
        try:
            with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f"LISTEN {repository.NOTIFY_CHANNEL}")
                # Anything sent while we were not listening: look once.
                wake.set()
                wait = 0.1
                while not finish.is_set():
                    for _ in conn.notifies(timeout=0.5, stop_after=1):
                        wake.set()
        except psycopg.Error as exc:
            logger.info(
                "listener disconnected; polling until it reconnects",
                extra={"action": "worker.listen_lost", "error": type(exc).__name__},
            )
            finish.wait(wait)
            wait = min(wait * 2, MAX_RETRY_WAIT_SECONDS)
