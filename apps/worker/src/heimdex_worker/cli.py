"""`heimdex worker` and `heimdex dispatcher`: thin shells over `heimdex_worker.main`."""

from __future__ import annotations

import click

from heimdex_common.logs import configure_logging
from heimdex_common.settings import load_settings
from heimdex_worker.main import run_dispatcher, run_worker, stop_on_signals


@click.command()
@click.option("--threads", type=click.IntRange(min=1), help="Worker threads (default: settings).")
def worker(threads: int | None) -> None:
    """Run jobs delivered through Redis; SIGTERM releases running jobs at a stage boundary."""
    settings = load_settings()
    configure_logging()
    run_worker(settings, stop_on_signals(), threads=threads)


@click.command()
def dispatcher() -> None:
    """Publish the outbox to Redis and return jobs with expired leases to the queue."""
    settings = load_settings()
    configure_logging()
    run_dispatcher(settings, stop_on_signals())
