"""`heimdex jobs ...`: the operator's console in a terminal, a thin click shell over
`heimdex.ledger.operations`. Acts on every org: it talks to the database directly, with
the backend's role, and is meant for the people who run Heimdex, not for tenants."""

from __future__ import annotations

import getpass
import json
import os
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from heimdex.ledger import operations as ops
from heimdex.ledger import repository
from heimdex.ledger.cli_database import (
    URL_HELP,
    JobsGroup,
    command_engine,
    note_url,
    read_engine,
)
from heimdex.ledger.fingerprint import error_fingerprint
from heimdex.ledger.repository import JobFilter
from heimdex.ledger.retention_cli import prune
from heimdex.models import JobStatus

F = TypeVar("F", bound=Callable[..., Any])

STATUSES = [s.value for s in JobStatus]
DATES = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M"]


def _uuid(_ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    def one(raw: str) -> uuid.UUID:
        try:
            return uuid.UUID(raw)
        except ValueError:
            raise click.BadParameter(f"{raw!r} is not a UUID", param=param) from None

    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(one(v) for v in value)
    return one(value)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class _Aliased(click.Option):
    """Every spelling works; `--help` shows the first (`--status`, the API's and the
    column's word), not the older ones (`--state`)."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        spellings, self.opts = self.opts, self.opts[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = spellings

    def get_error_hint(self, ctx: click.Context | None) -> str:
        return f"'{self.opts[0]}'"


def _filter_options(f: F) -> F:
    options = [
        click.option("--status", "--state", "statuses", cls=_Aliased, multiple=True,
                     type=click.Choice(STATUSES),
                     help="Only jobs with this status (repeat for several)."),
        click.option("--type", "type_", metavar="TYPE", help="Only jobs of this type."),
        click.option("--queue", metavar="Q", help="Only jobs of this queue."),
        click.option("--org", callback=_uuid, metavar="UUID", help="Only this org's jobs."),
        click.option("--error-code", metavar="CODE", help="Only jobs whose last error has it."),
        click.option("--fingerprint", metavar="HEX",
                     help="Only jobs whose last error has this fingerprint (see `failures`)."),
        click.option("--created-after", type=click.DateTime(DATES), metavar="TIME",
                     help="Created at or after (UTC unless it says otherwise)."),
        click.option("--created-before", type=click.DateTime(DATES), metavar="TIME",
                     help="Created before (UTC)."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def _filter(
    ids: Sequence[uuid.UUID] | None,
    *,
    statuses: Sequence[str],
    type_: str | None,
    queue: str | None,
    org: uuid.UUID | None,
    error_code: str | None,
    fingerprint: str | None,
    created_after: datetime | None,
    created_before: datetime | None,
) -> JobFilter:
    return JobFilter(
        ids=tuple(ids) if ids else None,
        statuses=tuple(JobStatus(s) for s in statuses),
        type=type_,
        queue=queue,
        org_id=org,
        error_code=error_code,
        error_fingerprint=fingerprint,
        created_after=_utc(created_after),
        created_before=_utc(created_before),
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else ""


def job_dict(job: repository.JobRow) -> dict[str, Any]:
    """A job as JSON-ready values (the CLI's `--json`)."""
    out = {k: v for k, v in job._mapping.items() if k != "lease_token"}
    out["error_fingerprint"] = (
        error_fingerprint(job.last_error_code, job.last_error_message)
        if job.last_error_code or job.last_error_message
        else None
    )
    clean: dict[str, Any] = json.loads(json.dumps(out, default=str))
    return clean


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


@click.group(
    cls=JobsGroup,
    epilog="""\b
Examples:
  heimdex jobs stats                          # counts by status, type, org; throughput
  heimdex jobs failures                       # dead letters grouped by error fingerprint
  heimdex jobs list --status dead_letter --org 2f0c5e0e-8a3a-4f7e-9a39-4b4a0f0c1d2e
  heimdex jobs retry --fingerprint 3fa2c1d09b7e --dry-run    # how many; needs no reason
  heimdex jobs retry --fingerprint 3fa2c1d09b7e --reason "upstream fixed" --yes
  heimdex jobs prune --dry-run                # what retention would delete now

Against the stack of `heimdex dev`: `. .heimdex/dev.env` first (it exports DATABASE_URL).
""",
)
@click.option("--database-url", metavar="URL", default=None, help=URL_HELP)
@click.pass_context
def jobs(ctx: click.Context, database_url: str | None) -> None:
    """Find, retry, cancel and requeue jobs of every org (operators only).

    Every change writes an event per job naming the actor (--actor, default $USER) and the
    reason. Bulk changes (several ids, or a filter) show the count and ask first unless --yes,
    and run in batches of --batch-size jobs, each its own short transaction.
    """
    note_url(ctx, database_url)


jobs.add_command(prune)


@jobs.command("list")
@_filter_options
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON array of jobs.")
@click.pass_context
def list_(ctx: click.Context, /, limit: int, as_json: bool, **filters: Any) -> None:
    """Jobs of every org, newest first.

    \b
    Examples:
      heimdex jobs list --status dead_letter --type transcode
      heimdex jobs list --queue gpu --status queued
      heimdex jobs list --org 2f0c5e0e-8a3a-4f7e-9a39-4b4a0f0c1d2e --json
    """
    with read_engine(ctx) as engine, engine.connect() as conn:
        rows = repository.list_jobs_ops(conn, _filter(None, **filters), limit=limit)
    if as_json:
        _echo_json([job_dict(r) for r in rows])
        return
    click.echo(
        _table(
            ["ID", "STATUS", "TYPE", "QUEUE", "ORG", "ATTEMPT", "CREATED", "ERROR"],
            [
                (
                    r.id,
                    r.status.value,
                    r.type,
                    r.queue,
                    r.org_id,
                    f"{r.attempt}/{r.max_attempts}",
                    _when(r.created_at),
                    r.last_error_code,
                )
                for r in rows
            ],
        )
    )
    if not rows:
        click.echo("(no jobs match)", err=True)


@jobs.command()
@click.argument("job_id", callback=_uuid)
@click.option("--json", "as_json", is_flag=True, help="The job and its events as JSON.")
@click.pass_context
def show(ctx: click.Context, job_id: uuid.UUID, as_json: bool) -> None:
    """One job of any org, with its events.

    \b
    Example:
      heimdex jobs show 0b9c1a52-5d1e-4f0a-9c57-1f8d7c2b6a10
    """
    with command_engine(ctx) as engine, engine.connect() as conn:
        job = repository.get_job(conn, job_id)
        events = repository.list_events(conn, job_id)
    data = job_dict(job)
    event_list = [
        {"ts": e.ts, "from": e.prev_status, "to": e.next_status, "detail": e.detail_json}
        for e in events
    ]
    if as_json:
        _echo_json({**data, "events": event_list})
        return
    for key, value in data.items():
        if value not in (None, {}, ""):
            click.echo(f"{key + ':':<20}{json.dumps(value) if isinstance(value, dict) else value}")
    click.echo("\nevents:")
    click.echo(
        _table(
            ["TIME", "FROM", "TO", "DETAIL"],
            [
                (_when(e["ts"]), e["from"] or "-", e["to"], json.dumps(e["detail"] or {}))
                for e in event_list
            ],
        )
    )


def _action_command(action: ops.Action, summary: str, example: str) -> click.Command:
    past = {"retry": "retried", "cancel": "canceled", "requeue": "requeued"}[action.value]

    @click.pass_context
    def command(
        ctx: click.Context,
        /,
        *,
        job_ids: tuple[uuid.UUID, ...],
        reason: str | None,
        actor: str | None,
        dry_run: bool,
        yes: bool,
        batch_size: int,
        from_scratch: bool = False,
        **filters: Any,
    ) -> None:
        if action is ops.Action.RETRY and not dry_run and not (reason or "").strip():
            raise click.UsageError(
                "Missing option '--reason': a retry writes why to every job's events "
                "(--dry-run needs none)",
                ctx,
            )
        f = _filter(job_ids, **filters)
        operator = ops.Operator(actor or os.environ.get("USER") or getpass.getuser(), reason)
        with command_engine(ctx) as engine:
            if len(job_ids) == 1 and f == JobFilter(ids=job_ids):
                if dry_run:
                    with engine.connect() as conn:
                        n = repository.count_eligible(conn, action.value, f)
                    click.echo(f"{n} job{'' if n == 1 else 's'} would be {past}")
                    return
                with engine.begin() as conn:
                    job = ops.operate(conn, action, job_ids[0], operator, from_scratch=from_scratch)
                click.echo(f"{job.id}: {job.status.value}")
                return
            with engine.connect() as conn:
                n = ops.preview(conn, action, f)
            if dry_run:
                click.echo(f"{n} job{'' if n == 1 else 's'} would be {past}")
                return
            if n == 0:
                click.echo(f"no job to {action.value}")
                return
            if not yes:
                click.confirm(f"{action.value.capitalize()} {n} jobs?", abort=True, err=True)
            result = ops.bulk(
                engine, action, f, operator, batch_size=batch_size, from_scratch=from_scratch
            )
        click.echo(f"{past} {result.jobs} jobs in {result.batches} batches")

    command.__doc__ = f"""{summary}

    Give job ids, or a filter (bulk: the count is shown and confirmed first unless --yes).

    \b
    Examples:
    {example}"""
    options = [
        click.argument("job_ids", nargs=-1, callback=_uuid),
        click.option(
            "--reason",
            help="Why (written to every event)."
            + (" Required, except with --dry-run." if action is ops.Action.RETRY else ""),
        ),
        click.option("--actor", help="Who acts (default: $USER)."),
        click.option("--dry-run", is_flag=True, help="Print how many jobs it would change."),
        click.option("--yes", "-y", is_flag=True, help="Do not ask before a bulk change."),
        click.option("--batch-size", type=click.IntRange(1, ops.MAX_BATCH_SIZE),
                     default=ops.DEFAULT_BATCH_SIZE, show_default=True,
                     help="Jobs per transaction of a bulk change."),
    ]  # fmt: skip
    if action is ops.Action.RETRY:
        options.append(
            click.option(
                "--from-scratch",
                is_flag=True,
                help="Drop each job's checkpoint: the next attempt starts afresh instead of "
                "resuming where the last one saved.",
            )
        )
    decorated: Callable[..., Any] = _filter_options(command)
    for option in reversed(options):
        decorated = option(decorated)
    return click.command(action.value)(decorated)


jobs.add_command(
    _action_command(
        ops.Action.RETRY,
        "Retry dead-lettered, failed or canceled jobs: queued now, attempts back to 0, resuming\n"
        "    from each job's checkpoint (--from-scratch: start afresh).",
        """  heimdex jobs retry 0b9c1a52-5d1e-4f0a-9c57-1f8d7c2b6a10 --reason "fixed the bucket ACL"
      heimdex jobs retry 0b9c1a52-5d1e-4f0a-9c57-1f8d7c2b6a10 --reason "bad output" --from-scratch
      heimdex jobs retry --status dead_letter --error-code UPSTREAM_TIMEOUT --dry-run
      heimdex jobs retry --fingerprint 3fa2c1d09b7e --reason "upstream back" --yes""",
    )
)
jobs.add_command(
    _action_command(
        ops.Action.CANCEL,
        "Cancel queued jobs now; ask running ones to stop at their next stage.",
        """  heimdex jobs cancel 0b9c1a52-5d1e-4f0a-9c57-1f8d7c2b6a10 --reason "duplicate"
      heimdex jobs cancel --org 2f0c5e0e-8a3a-4f7e-9a39-4b4a0f0c1d2e --type transcode --dry-run""",
    )
)
jobs.add_command(
    _action_command(
        ops.Action.REQUEUE,
        "Make queued jobs that wait (backoff, schedule) due now.",
        """  heimdex jobs requeue 0b9c1a52-5d1e-4f0a-9c57-1f8d7c2b6a10
      heimdex jobs requeue --status queued --type transcode --yes""",
    )
)


@jobs.command()
@click.option("--org", callback=_uuid, metavar="UUID", help="Only this org.")
@click.option("--minutes", type=click.IntRange(1, 1440), default=15, show_default=True,
              help="Throughput window.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def stats(ctx: click.Context, org: uuid.UUID | None, minutes: int, as_json: bool) -> None:
    """Counts by status, type and org; the oldest due job; throughput of the last minutes.

    \b
    Examples:
      heimdex jobs stats
      heimdex jobs stats --org 2f0c5e0e-8a3a-4f7e-9a39-4b4a0f0c1d2e --minutes 60 --json
    """
    with read_engine(ctx) as engine, engine.connect() as conn:
        s = ops.stats(conn, org_id=org, minutes=minutes)
    succeeded = sum(m.succeeded for m in s.throughput)
    failed = sum(m.failed for m in s.throughput)
    if as_json:
        _echo_json(
            {
                "by_status": s.by_status,
                "by_type": s.by_type,
                "by_org": {str(k): v for k, v in s.by_org.items()},
                "oldest_due": job_dict(s.oldest_due) if s.oldest_due else None,
                "oldest_due_seconds": round(s.oldest_due_seconds, 3),
                "minutes": minutes,
                "succeeded": succeeded,
                "failed": failed,
                "per_minute": [vars(m) for m in s.throughput],
            }
        )
        return
    click.echo(_table(["STATUS", "JOBS"], list(s.by_status.items())))
    for title, groups in (("TYPE", s.by_type), ("ORG", s.by_org)):
        click.echo("")
        click.echo(
            _table(
                [title, *STATUSES],
                [
                    (k, *(v.get(st, 0) for st in STATUSES))
                    for k, v in sorted(groups.items(), key=str)
                ],
            )
        )
    click.echo("")
    if s.oldest_due is not None:
        click.echo(
            f"oldest due job: {s.oldest_due.id} ({s.oldest_due.type}, org "
            f"{s.oldest_due.org_id}), due {s.oldest_due_seconds:.1f}s ago"
        )
    else:
        click.echo("oldest due job: none (nothing waits)")
    click.echo(
        f"last {minutes} min: {succeeded} succeeded, {failed} failed attempts "
        f"({succeeded / minutes:.1f} succeeded/min)"
    )


@jobs.command()
@click.option("--status", "--state", "statuses", cls=_Aliased, multiple=True,
              type=click.Choice(["dead_letter", "failed"]),
              help="Which failures (default: dead_letter).")  # fmt: skip
@click.option("--org", callback=_uuid, metavar="UUID", help="Only this org.")
@click.option("--type", "type_", metavar="TYPE", help="Only this job type.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def failures(
    ctx: click.Context,
    /,
    *,
    statuses: tuple[str, ...],
    org: uuid.UUID | None,
    type_: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Dead letters grouped by error code and message fingerprint, largest group first.

    The fingerprint masks numbers and UUIDs in the message, so one cause is one group; retry
    a group with `heimdex jobs retry --fingerprint HEX --reason ...`.

    \b
    Examples:
      heimdex jobs failures
      heimdex jobs failures --status failed --org 2f0c5e0e-8a3a-4f7e-9a39-4b4a0f0c1d2e --json
    """
    wanted = [JobStatus(s) for s in statuses] or [JobStatus.DEAD_LETTER]
    with read_engine(ctx) as engine, engine.connect() as conn:
        groups = ops.failures(conn, statuses=wanted, org_id=org, type=type_, limit=limit)
    if as_json:
        _echo_json([vars(g) for g in groups])
        return
    if not groups:
        click.echo("no failures", err=True)
        return
    click.echo(
        _table(
            ["JOBS", "CODE", "FINGERPRINT", "ORGS", "TYPES", "LAST", "SAMPLE MESSAGE"],
            [
                (
                    g.jobs,
                    g.error_code,
                    g.fingerprint,
                    g.orgs,
                    ",".join(g.types),
                    _when(g.last_failed_at),
                    (g.sample_message or "")[:80],
                )
                for g in groups
            ],
        )
    )
