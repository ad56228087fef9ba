"""Where a database stands against the history: `heimdex db status`."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from heimdex.errors import HeimdexError
from heimdex.ledger.backfills import Progress, progress
from heimdex_db.context import DbContext
from heimdex_db.history import connect, current_revisions, inspect_with_env


class StatusCode(IntEnum):
    """Exit codes of `heimdex db status` (1 stays "error", as for every command)."""

    AT_HEAD = 0
    PENDING = 3
    DRIFT = 4
    MULTIPLE_HEADS = 5
    UNKNOWN_REVISION = 6


@dataclass(frozen=True)
class Pending:
    revision: str
    message: str


@dataclass
class Status:
    current: tuple[str, ...]
    heads: tuple[str, ...]
    pending: list[Pending] = field(default_factory=list)
    unknown: tuple[str, ...] = ()
    drift: list[str] = field(default_factory=list)
    # Every backfill a data revision handed to the ledger, done or not (they do not change
    # the exit code: a contract revision that needs one refuses on its own).
    backfills: list[Progress] = field(default_factory=list)

    @property
    def code(self) -> StatusCode:
        if len(self.heads) > 1:
            return StatusCode.MULTIPLE_HEADS
        if self.unknown:
            return StatusCode.UNKNOWN_REVISION
        if self.pending:
            return StatusCode.PENDING
        if self.drift:
            return StatusCode.DRIFT
        return StatusCode.AT_HEAD


def describe_diff(diff: object) -> str:
    """One line for an entry of `compare_metadata`'s result."""
    if isinstance(diff, list):
        return "; ".join(describe_diff(d) for d in diff)
    if isinstance(diff, tuple) and diff:
        name, *args = diff
        rendered = []
        for arg in args:
            if arg is None:
                continue
            named = getattr(arg, "name", None)
            rendered.append(str(named) if named is not None else repr(arg))
        return f"{name} {' '.join(rendered)}"
    return repr(diff)


def model_drift(context: MigrationContext) -> list[str]:
    """Differences between the models (env.py's target metadata) and the database."""
    metadata = context.opts.get("target_metadata")
    if metadata is None:
        raise HeimdexError("env.py configures no target_metadata: cannot compare the models")
    return [describe_diff(d) for d in compare_metadata(context, metadata)]


def _known(scripts: ScriptDirectory, revision: str) -> bool:
    try:
        return scripts.get_revision(revision) is not None
    except CommandError:  # ResolutionError: not in this history
        return False


def status(ctx: DbContext) -> Status:
    """Current revision, heads, pending revisions (oldest first), model drift and backfills.

    Drift is only computed when the database is at the (single) head: before that the
    differences are the pending revisions themselves.
    """
    cfg = ctx.config
    scripts = ctx.scripts()
    heads = tuple(scripts.get_heads())
    with connect(ctx.url) as conn:
        current = current_revisions(cfg, conn)
        unknown = tuple(r for r in current if not _known(scripts, r))
        result = Status(current=current, heads=heads, unknown=unknown)
        result.backfills = progress(conn)
        if conn.in_transaction():
            conn.rollback()
        if len(heads) != 1 or unknown:
            return result
        if current == heads:
            result.drift = inspect_with_env(cfg, conn, model_drift)
            return result
        for script in scripts.iterate_revisions(heads[0], current[0] if current else "base"):
            if script.revision not in current:
                result.pending.append(Pending(script.revision, script.doc or ""))
        result.pending.reverse()
    return result
