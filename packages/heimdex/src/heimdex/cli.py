"""The `heimdex` command. A thin shell: commands live in plain functions elsewhere.

Sub-commands come from the `heimdex.cli` entry-point group, so `heimdex api`, `heimdex worker`
and friends are contributed by the apps without this package importing them; `heimdex db`
comes the same way, so a process imports only the command it runs.
"""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, entry_points

import click

from heimdex import __version__
from heimdex.errors import HeimdexError

ENTRY_POINT_GROUP = "heimdex.cli"


class HeimdexGroup(click.Group):
    """Loads plugin commands lazily and turns `HeimdexError` into one line and exit code 1."""

    def _plugins(self) -> dict[str, EntryPoint]:
        return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugins()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        # Only the command asked for is imported: `heimdex worker` never loads Alembic.
        found = super().get_command(ctx, cmd_name)
        if found is None and (ep := self._plugins().get(cmd_name)) is not None:
            command: click.Command = ep.load()
            return command
        return found

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except HeimdexError as exc:
            click.secho(f"error: {exc}", err=True, fg="red")
            sys.exit(1)


@click.group(
    cls=HeimdexGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="""\b
Examples:
  heimdex dev                       # the whole stack on this machine (PostgreSQL, API, worker)
  heimdex db upgrade                # migrate the configured database to head
""",
)
@click.version_option(__version__, prog_name="heimdex")
def main() -> None:
    """Heimdex core: the durable job ledger, its migrations, API and workers."""
