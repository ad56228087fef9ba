"""Process entrypoints: build dependencies from the settings, run until told to stop."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

import dramatiq
from prometheus_client import start_http_server

from heimdex_common.db import make_engine, make_session_factory
from heimdex_common.settings import Settings
from heimdex_worker.broker import declare_actor, make_broker
from heimdex_worker.dispatcher import Dispatcher
from heimdex_worker.metrics import WorkerMetrics
from heimdex_worker.runner import JobRunner

logger = logging.getLogger(__name__)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def run_worker(settings: Settings, stop: threading.Event, *, threads: int | None = None) -> None:
    """Consume deliveries until `stop`; then release running jobs at their next stage boundary
    and wait up to the shutdown grace for them."""
    threads = threads or settings.worker_threads
    engine = make_engine(settings.sqlalchemy_url, pool_size=threads * 2 + 1)
    broker = make_broker(settings)
    metrics = WorkerMetrics()
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, registry=metrics.registry)
    runner = JobRunner(
        settings,
        make_session_factory(engine),
        worker_id=f"{socket.gethostname()}:{os.getpid()}",
        metrics=metrics,
    )
    declare_actor(broker, runner.run, queue_name=settings.queue_name)
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=settings.worker_idle_ms)
    worker.start()
    logger.info(
        "worker started",
        extra={"action": "worker.started", "threads": threads, "queue": settings.queue_name},
    )
    stop.wait()
    logger.info("worker stopping", extra={"action": "worker.stopping"})
    runner.stopping.set()
    worker.stop(timeout=int(settings.shutdown_grace_seconds * 1000))
    broker.close()
    engine.dispose()
    logger.info("worker stopped", extra={"action": "worker.stopped"})


def run_dispatcher(settings: Settings, stop: threading.Event) -> None:
    engine = make_engine(settings.sqlalchemy_url, pool_size=2)
    broker = make_broker(settings)
    dispatcher = Dispatcher(settings, make_session_factory(engine), broker)
    logger.info("dispatcher started", extra={"action": "dispatcher.started"})
    dispatcher.run(stop)
    broker.close()
    engine.dispose()
    logger.info("dispatcher stopped", extra={"action": "dispatcher.stopped"})
