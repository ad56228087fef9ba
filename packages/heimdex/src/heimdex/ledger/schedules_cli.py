"""`heimdex schedules ...`: an org's periodic schedules (ledger/schedules.py), over the
database directly with the backend's role, for operators."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import click

from heimdex.ledger import schedules as sched
from heimdex.ledger.cli_database import URL_HELP, JobsGroup, command_engine, note_url
from heimdex.ledger.registry import load_registry
from heimdex.settings import load_settings


def _org(_ctx: click.Context, param: click.Parameter, value: str | None) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a UUID", param=param) from None


def _params(_ctx: click.Context, param: click.Parameter, value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param=param) from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object", param=param)
    return parsed


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "-"


def _as_dict(s: sched.Schedule) -> dict[str, Any]:
    return {
        "org_id": str(s.org_id),
        "name": s.name,
        "type": s.type,
        "params": s.params,
        "cron": s.cron,
        "declared": s.declared,
        "paused": s.paused,
        "next_fire_at": s.next_fire_at.isoformat(),
        "last_fire_at": s.last_fire_at.isoformat() if s.last_fire_at else None,
        "last_job_id": str(s.last_job_id) if s.last_job_id else None,
        "last_job_status": s.last_job_status,
    }


ORG = click.option(
    "--org", required=True, callback=_org, metavar="UUID", help="The org of the schedule."
)


@click.group(
    cls=JobsGroup,
    epilog="""\b
Examples:
  heimdex schedules add --org 2f0c5e0e-8a3a-4f7e-9a39-4b4a0f0c1d2e nightly-report \\
      --type report --cron "0 3 * * *" --params '{"kind": "daily"}'
  heimdex schedules list
  heimdex schedules pause --org 2f0c5e0e-8a3a-4f7e-9a39-4b4a0f0c1d2e nightly-report
""",
)
@click.option("--database-url", metavar="URL", default=None, help=URL_HELP)
@click.pass_context
def schedules(ctx: click.Context, database_url: str | None) -> None:
    """Periodic schedules: each fire time (cron, UTC) becomes one job of the org.

    Workers fire them; after downtime a schedule fires once, for the latest fire time it
    missed. A resumed schedule skips the fire times missed while paused."""
    note_url(ctx, database_url)


@schedules.command()
@ORG
@click.argument("name")
@click.option("--type", "type_", required=True, metavar="TYPE", help="Job type to submit.")
@click.option("--cron", required=True, metavar="EXPR", help="Five fields, UTC.")
@click.option("--params", callback=_params, default="{}", metavar="JSON", help="Job params.")
@click.pass_context
def add(
    ctx: click.Context,
    *,
    org: uuid.UUID,
    name: str,
    type_: str,
    cron: str,
    params: dict[str, Any],
) -> None:
    """Add the org's schedule NAME."""
    registry = load_registry(load_settings().job_module_specs)
    with command_engine(ctx) as engine, engine.begin() as conn:
        added = sched.add_schedule(
            conn, registry, org_id=org, name=name, type=type_, cron=cron, params=params
        )
    click.echo(f"added {added.name}: next fire {_when(added.next_fire_at)}")


@schedules.command("list")
@click.option("--org", callback=_org, metavar="UUID", help="Only this org's schedules.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of schedules.")
@click.pass_context
def list_(ctx: click.Context, org: uuid.UUID | None, as_json: bool) -> None:
    """Schedules by next fire time, with their last job."""
    with command_engine(ctx) as engine, engine.connect() as conn:
        found = sched.list_schedules(conn, org)
    if as_json:
        click.echo(json.dumps([_as_dict(s) for s in found], indent=2))
        return
    header = ("ORG", "NAME", "TYPE", "CRON", "STATE", "NEXT FIRE", "LAST JOB", "LAST STATUS")
    lines = [header] + [
        (
            str(s.org_id),
            s.name,
            s.type,
            s.cron.replace(" ", "_"),
            "paused" if s.paused else "active",
            _when(s.next_fire_at),
            str(s.last_job_id or "-"),
            s.last_job_status or "-",
        )
        for s in found
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        click.echo("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


@schedules.command()
@ORG
@click.argument("name")
@click.pass_context
def remove(ctx: click.Context, org: uuid.UUID, name: str) -> None:
    """Remove the org's schedule NAME (the jobs it submitted stay)."""
    with command_engine(ctx) as engine, engine.begin() as conn:
        sched.remove_schedule(conn, org, name)
    click.echo(f"removed {name}")


@schedules.command()
@ORG
@click.argument("name")
@click.pass_context
def pause(ctx: click.Context, org: uuid.UUID, name: str) -> None:
    """Pause the org's schedule NAME: it does not fire until resumed."""
    with command_engine(ctx) as engine, engine.begin() as conn:
        sched.set_paused(conn, org, name, paused=True)
    click.echo(f"paused {name}")


@schedules.command()
@ORG
@click.argument("name")
@click.pass_context
def resume(ctx: click.Context, org: uuid.UUID, name: str) -> None:
    """Resume the org's schedule NAME from its next fire time (missed ones are skipped)."""
    with command_engine(ctx) as engine, engine.begin() as conn:
        resumed = sched.set_paused(conn, org, name, paused=False)
    click.echo(f"resumed {name}: next fire {_when(resumed.next_fire_at)}")
