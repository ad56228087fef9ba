"""`heimdex worker`: a thin shell over `heimdex_worker.main`."""

from __future__ import annotations

import click

from heimdex.logs import configure_logging
from heimdex.settings import MAX_WORKER_CONCURRENCY, load_settings
from heimdex_worker.main import parse_queues, run_worker, stop_on_signals


@click.command(
    epilog="""\b
Examples:
  heimdex worker                    # HEIMDEX_WORKER_CONCURRENCY threads
  heimdex worker --concurrency 8 --batch 8
  heimdex worker --queues gpu               # a GPU pool: only the gpu queue's jobs
"""
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, MAX_WORKER_CONCURRENCY),
    help="Jobs run at once, one thread each (default: HEIMDEX_WORKER_CONCURRENCY, 4); the "
    "threads share HEIMDEX_WORKER_DB_CONNECTIONS connections whatever their number.",
)
@click.option(
    "--batch",
    type=click.IntRange(1, 1000),
    help="Most jobs claimed by one statement (default: HEIMDEX_CLAIM_BATCH, 4). The worker "
    "holds at most max(concurrency, batch) jobs, and one batch more while jobs take under "
    "50 ms; for long jobs keep it at the concurrency.",
)
@click.option(
    "--queues",
    metavar="Q[,Q...]",
    help="Claim only these queues' jobs, and need handlers only for their types (default: "
    "HEIMDEX_WORKER_QUEUES, or every queue of the job types installed).",
)
def worker(concurrency: int | None, batch: int | None, queues: str | None) -> None:
    """Claim due jobs from PostgreSQL and run them, until SIGTERM or Ctrl-C.

    Wakes on NOTIFY and polls every HEIMDEX_POLL_INTERVAL_SECONDS; renews its leases and reaps
    expired ones. On SIGTERM, jobs not started and jobs at a stage boundary go back to the queue.
    Exits 3 when every slot's handler is stuck past its execution timeout.
    """
    settings = load_settings()
    configure_logging("worker", **settings.log_options)
    code = run_worker(
        settings,
        stop_on_signals(),
        concurrency=concurrency,
        batch=batch,
        queues=parse_queues(queues) if queues is not None else None,
    )
    if code:
        raise SystemExit(code)
