"""`heimdex jobs prune`: a thin click shell over `heimdex.ledger.retention`."""

from __future__ import annotations

from pathlib import Path

import click

from heimdex.errors import HeimdexError
from heimdex.ledger import retention
from heimdex.ledger.cli_database import URL_HELP, command_engine, note_url
from heimdex.logs import configure_logging
from heimdex.settings import Ages, RetentionPolicy, load_settings, parse_age


def _table(result: retention.PruneResult, verb: str) -> str:
    rows = [(label, c.jobs, c.events) for label, c in result.by_target.items()]
    rows.append(("total", result.jobs, result.events))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'what':<{width}}  {'jobs ' + verb:>14}  {'events ' + verb:>16}"]
    lines += [f"{label:<{width}}  {jobs:>14}  {events:>16}" for label, jobs, events in rows]
    return "\n".join(lines)


@click.command(
    epilog="""\b
Examples:
  heimdex jobs prune --dry-run           # what the configured ages would delete now
  heimdex jobs prune --dry-run --older-than 7d
  heimdex jobs prune                     # delete it, 100 jobs per transaction, paced
  heimdex jobs prune --pause-factor 0    # batches back to back: faster, less room for others
  heimdex jobs prune --older-than 90d --archive /var/lib/heimdex/pruned.jsonl
"""
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option(
    "--older-than",
    metavar="AGE",
    help="One age (30d, 12h, 90m, 2w) for every finished status, instead of "
    "HEIMDEX_RETENTION_SUCCEEDED (succeeded, canceled) and HEIMDEX_RETENTION_FAILED (failed, "
    "dead_letter). Orgs of HEIMDEX_RETENTION_ORGS keep their own ages.",
)
@click.option(
    "--archive",
    "archive_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append each job, with its events, as a JSON line to this file before deleting it "
    "(default: HEIMDEX_RETENTION_ARCHIVE; none when empty).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10000),
    help="Jobs deleted per transaction (default: HEIMDEX_RETENTION_BATCH, 100).",
)
@click.option(
    "--pause-factor",
    type=click.FloatRange(0, 100),
    help="After each batch, sleep this many times as long as it took (default: "
    "HEIMDEX_RETENTION_PAUSE_FACTOR, 1: busy at most half the time; 0: back to back).",
)
@click.option("--database-url", metavar="URL", help=URL_HELP)
def prune(  # click passes the options by name
    *,
    dry_run: bool,
    older_than: str | None,
    archive_path: Path | None,
    batch_size: int | None,
    pause_factor: float | None,
    database_url: str | None,
) -> None:
    """Delete finished jobs (and their events) older than the retention ages.

    Workers run the same pass in their keeper every HEIMDEX_RETENTION_INTERVAL_SECONDS; this
    command runs it once, to the end, now. Only one pass runs at a time in a deployment (an
    advisory lock): if another holds it, nothing is done and the exit code is 1. Running and
    queued jobs are never deleted.
    """
    # `heimdex jobs --database-url URL prune` as well as `heimdex jobs prune --database-url URL`
    ctx = click.get_current_context()
    note_url(ctx, database_url)
    settings = load_settings()
    configure_logging("prune", **settings.log_options)
    policy = settings.retention_policy
    if older_than is not None:
        age = parse_age(older_than)
        policy = RetentionPolicy(Ages(age, age), policy.orgs)
    # A pass holds a session advisory lock (one pruner at a time); a dry run only counts.
    with command_engine(ctx, session=not dry_run) as engine:
        if dry_run:
            with engine.connect() as conn:
                result = retention.dry_run(conn, policy)
            click.echo(_table(result, "to go"))
            return
        path = archive_path or (
            Path(settings.retention_archive) if settings.retention_archive else None
        )
        archive = retention.JsonlArchive(path) if path else None
        try:
            result = retention.prune(
                engine,
                policy,
                batch_size=batch_size or settings.retention_batch,
                archive=archive,
                pause_factor=(
                    settings.retention_pause_factor if pause_factor is None else pause_factor
                ),
            )
        finally:
            if archive is not None:
                archive.close()
        if result.skipped:
            raise HeimdexError("another retention pass holds the lock; nothing was deleted")
        click.echo(_table(result, "deleted"))
        click.echo(
            f"{result.batches} batches in {result.seconds:.1f}s,"
            f" longest {result.longest_batch_seconds * 1000:.0f} ms,"
            f" paused {result.paused_seconds:.1f}s"
            + ("" if result.complete else "; some rows were locked: run again to finish")
        )
