"""Process entrypoint of `heimdex worker`: build dependencies from the settings, run until told
to stop."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from prometheus_client import start_http_server
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from heimdex.db import make_engine
from heimdex.errors import HeimdexError
from heimdex.ledger.registry import check_queue_name, load_registry
from heimdex.metrics import LedgerMetrics
from heimdex.models import DEFAULT_QUEUE
from heimdex.replica import make_read_engines
from heimdex.settings import Settings
from heimdex_worker.db import Budget
from heimdex_worker.listener import APPLICATION_NAME
from heimdex_worker.metrics import WorkerMetrics
from heimdex_worker.runtime import Worker

logger = logging.getLogger(__name__)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _session_engine(settings: Settings, engine: Engine) -> Engine | None:
    """The engine of what needs a session (LISTEN, retention's lock): `engine` unless it is a
    transaction pooler's; then one on `HEIMDEX_SESSION_DATABASE_URL` (one connection: retention
    holds one per pass, the listener connects on its own), or None without it."""
    url = settings.session_url
    if url is None:
        return None
    if url == settings.sqlalchemy_url:
        return engine
    return make_engine(url, pool_mode=settings.pool_mode_of(url), pool_size=1, max_overflow=1)


def parse_queues(raw: str) -> list[str]:
    """`gpu,default` -> ["gpu", "default"]; a bad name is one clear error."""
    names = [q.strip() for q in raw.split(",") if q.strip()]
    if not names:
        raise HeimdexError("--queues needs at least one queue name, e.g. --queues gpu,default")
    return list(dict.fromkeys(check_queue_name(q) for q in names))


def _named(url: URL) -> dict[str, str]:
    """The worker's `application_name`, unless the URL sets one."""
    return {} if "application_name" in url.query else {"application_name": APPLICATION_NAME}


def run_worker(
    settings: Settings,
    stop: threading.Event,
    *,
    concurrency: int | None = None,
    batch: int | None = None,
    queues: list[str] | None = None,
) -> int:
    """Claim and run jobs until `stop`; then release what has not started, let running jobs
    reach a stage boundary (released) or finish, up to the shutdown grace. Returns the exit
    code: non-zero when the worker stopped because every slot's handler was stuck."""
    registry = load_registry(settings.job_module_specs)
    if queues is None and settings.worker_queues.strip():
        queues = parse_queues(settings.worker_queues)
    queues = queues or registry.queues() or [DEFAULT_QUEUE]
    missing = registry.without_handler(queues)
    if missing:
        raise HeimdexError(
            f"job type(s) {', '.join(missing)} of queue(s) {', '.join(queues)} are registered "
            "without a handler in this process; install the package that provides them, "
            "remove their declaration, or claim other queues (--queues)"
        )
    concurrency = concurrency or settings.worker_concurrency
    batch = batch or settings.claim_batch
    budget = Budget.of(settings.worker_db_connections, concurrency=concurrency, batch=batch)
    # The lanes take their connections from this pool and never need more (`Budget`); the spare
    # one serves metrics scrapes and a retention slice.
    engine = make_engine(
        settings.sqlalchemy_url,
        pool_mode=settings.pool_mode,
        pool_size=budget.pool_size,
        max_overflow=0,
        connect_args=_named(settings.sqlalchemy_url),
    )
    session_engine = _session_engine(settings, engine)
    # The queue gauges accept lag: the replica of HEIMDEX_READ_DATABASE_URL, as the API's do.
    reads = make_read_engines(settings, engine, pool_size=1, max_overflow=1)
    metrics = WorkerMetrics(LedgerMetrics(engine, reads=reads))
    server = None
    if port := settings.worker_metrics_port:
        server, _ = start_http_server(port, registry=metrics.ledger.registry)
    worker = Worker(
        settings,
        engine,
        registry,
        worker_id=f"{socket.gethostname()}:{os.getpid()}",
        concurrency=concurrency,
        batch=batch,
        queues=queues,
        metrics=metrics,
        session_engine=session_engine,
    )
    logger.info(
        "worker started",
        extra={
            "action": "worker.started",
            "concurrency": concurrency,
            "batch": batch,
            "db_connections": budget.total,
            "pool_size": budget.pool_size,
            "claim_connections": budget.claims,
            "attempt_connections": budget.attempts,
            "handler_connections": budget.handlers,
            "types": registry.names(),
            "queues": queues,
            "listen": settings.listen and session_engine is not None,
            "pool_mode": settings.pool_mode.value,
        },
    )
    code = worker.run(stop)
    if server is not None:
        server.shutdown()
        server.server_close()
    reads.dispose()
    engine.dispose()
    if session_engine not in (None, engine):
        session_engine.dispose()
    logger.info("worker stopped", extra={"action": "worker.stopped", "exit_code": code})
    return code
