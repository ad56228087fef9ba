"""`heimdex limits ...`, `heimdex pause`, `heimdex resume`: caps, weights and pauses of the
queues (ledger/control.py), over the database directly with the backend's role, for operators.
Every change is an event naming the actor (--actor, default $USER) and the reason."""

from __future__ import annotations

import getpass
import json
import os
import uuid
from typing import Any

import click

from heimdex.ledger import control
from heimdex.ledger.cli_database import URL_HELP, JobsGroup, command_engine, note_url


def _org(_ctx: click.Context, param: click.Parameter, value: str | None) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an org id (a UUID)", param=param) from None


def _who(actor: str | None, reason: str) -> control.Who:
    return control.Who(actor or os.environ.get("USER") or getpass.getuser(), reason)


ORG = click.option("--org", callback=_org, metavar="UUID", help="The org (its jobs in any queue).")
QUEUE = click.option("--queue", metavar="Q", help="The queue (with --org: the org's jobs in it).")
REASON = click.option("--reason", required=True, help="Why (written to the change's event).")
ACTOR = click.option("--actor", help="Who acts (default: $USER).")
DATABASE = click.option("--database-url", metavar="URL", default=None, help=URL_HELP)


def limit_dict(limit: control.Limit) -> dict[str, Any]:
    return {
        "org_id": str(limit.org_id) if limit.org_id else None,
        "queue": limit.queue,
        "max_running": limit.max_running,
        "weight": limit.weight,
        "used": limit.used,
        "waiting": limit.waiting,
        "updated_at": limit.updated_at.isoformat(),
    }


def pause_dict(pause: control.Pause) -> dict[str, Any]:
    return {
        "kind": pause.kind,
        "value": pause.value,
        "actor": pause.actor,
        "reason": pause.reason,
        "since": pause.since.isoformat(),
    }


@click.group(
    cls=JobsGroup,
    epilog="""\b
Examples:
  heimdex limits set --org 2f0c5e0e-8a3a-4f7e-9a39-4b4a0f0c1d2e --max-running 4 --reason "plan"
  heimdex limits set --org 2f0c5e0e-8a3a-4f7e-9a39-4b4a0f0c1d2e --queue gpu --max-running 2 \\
      --reason "GPU share"
  heimdex limits set --queue gpu --max-running 16 --reason "16 GPUs"
  heimdex limits set --org 2f0c5e0e-8a3a-4f7e-9a39-4b4a0f0c1d2e --weight 3 --reason "pro plan"
  heimdex limits list
  heimdex limits unset --org 2f0c5e0e-8a3a-4f7e-9a39-4b4a0f0c1d2e --reason "plan ended"
""",
)
@DATABASE
@click.pass_context
def limits(ctx: click.Context, database_url: str | None) -> None:
    """Caps on jobs running at once (per org, per org in a queue, per queue) and org weights.

    A cap is exact: no interleaving of workers runs more of a scope's jobs at once. An org of
    weight w gets about w / (sum of the busy orgs' weights) of a saturated pool's starts."""
    note_url(ctx, database_url)


@limits.command("set")
@ORG
@QUEUE
@click.option("--max-running", type=int, metavar="N", help="Most jobs running at once.")
@click.option("--weight", type=int, metavar="W", help="The org's weight (1 to 1000).")
@REASON
@ACTOR
@click.pass_context
def set_(
    ctx: click.Context,
    *,
    org: uuid.UUID | None,
    queue: str | None,
    max_running: int | None,
    weight: int | None,
    reason: str,
    actor: str | None,
) -> None:
    """Set a cap and/or a weight."""
    with command_engine(ctx) as engine, engine.begin() as conn:
        limit = control.set_limit(
            conn,
            _who(actor, reason),
            org_id=org,
            queue=queue,
            max_running=max_running,
            weight=weight,
        )
    cap = "no cap" if limit.max_running is None else f"max running {limit.max_running}"
    click.echo(f"set: {cap}, weight {limit.weight}, {limit.used} running or placed now")


@limits.command("unset")
@ORG
@QUEUE
@click.option("--cap-only", is_flag=True, help="Drop the cap, keep the weight.")
@click.option("--weight-only", is_flag=True, help="Drop the weight, keep the cap.")
@REASON
@ACTOR
@click.pass_context
def unset(
    ctx: click.Context,
    *,
    org: uuid.UUID | None,
    queue: str | None,
    cap_only: bool,
    weight_only: bool,
    reason: str,
    actor: str | None,
) -> None:
    """Drop a cap and/or a weight; jobs the cap held go back to the queue."""
    if cap_only and weight_only:
        raise click.UsageError("--cap-only and --weight-only exclude each other")
    with command_engine(ctx) as engine, engine.begin() as conn:
        control.unset_limit(
            conn,
            _who(actor, reason),
            org_id=org,
            queue=queue,
            cap=not weight_only,
            weight=not cap_only,
        )
    click.echo("unset")


@limits.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: limits and pauses.")
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """Caps and weights, with the slots each cap counts now, and the pauses."""
    with command_engine(ctx) as engine, engine.connect() as conn:
        found = control.list_limits(conn)
        pauses = control.list_pauses(conn)
    if as_json:
        body = {"limits": [limit_dict(x) for x in found], "pauses": [pause_dict(p) for p in pauses]}
        click.echo(json.dumps(body, indent=2))
        return
    rows = [("ORG", "QUEUE", "MAX RUNNING", "USED", "WEIGHT", "WAITING")] + [
        (
            str(x.org_id) if x.org_id else "*",
            x.queue or "*",
            "-" if x.max_running is None else str(x.max_running),
            str(x.used) if x.max_running is not None else "-",
            str(x.weight),
            "yes" if x.waiting else "",
        )
        for x in found
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    for p in pauses:
        click.echo(
            f"paused {p.kind} {p.value} since {p.since:%Y-%m-%d %H:%M} by {p.actor}: {p.reason}"
        )


def _target(queue: str | None, type_: str | None, org: str | None) -> tuple[str, str]:
    given = [(k, v) for k, v in (("queue", queue), ("type", type_), ("org", org)) if v is not None]
    if len(given) != 1:
        raise click.UsageError("name exactly one of --queue, --type, --org")
    return given[0]


def _pause_command(resume: bool) -> click.Command:
    verb = "resume" if resume else "pause"

    @click.command(
        verb,
        epilog=f"""\b
Examples:
  heimdex {verb} --queue gpu --reason "driver upgrade"
  heimdex {verb} --type transcode --reason "codec bug"
  heimdex {verb} --org 2f0c5e0e-8a3a-4f7e-9a39-4b4a0f0c1d2e --reason "billing"
""",
    )
    @click.option("--queue", metavar="Q")
    @click.option("--type", "type_", metavar="TYPE")
    @click.option("--org", metavar="UUID")
    @REASON
    @ACTOR
    @DATABASE
    @click.pass_context
    def command(
        ctx: click.Context,
        *,
        queue: str | None,
        type_: str | None,
        org: str | None,
        reason: str,
        actor: str | None,
        database_url: str | None,
    ) -> None:
        kind, value = _target(queue, type_, org)
        note_url(ctx, database_url)
        with command_engine(ctx) as engine:
            if resume:
                with engine.begin() as conn:
                    control.resume(conn, _who(actor, reason), kind=kind, value=value)
                click.echo(f"resumed {kind} {value}")
                return
            with engine.begin() as conn:
                _, held = control.pause(conn, _who(actor, reason), kind=kind, value=value)
            with engine.begin() as conn:
                held += control.hold_stragglers(conn, kind=kind, value=value)
            click.echo(f"paused {kind} {value}: {held} queued job(s) held")

    command.help = (
        "Resume a paused queue, job type or org: its jobs are claimable at once (the workers "
        "are woken)."
        if resume
        else "Pause a queue, a job type or an org: its queued jobs are not claimed until "
        "resumed; running jobs finish."
    )
    return command


pause = _pause_command(resume=False)
resume = _pause_command(resume=True)
