"""`heimdex db ...`: a thin click shell over the functions of `heimdex_db`.

`HeimdexError` from any of them is printed as one line with exit code 1 by the root group.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy import Connection
from sqlalchemy.engine import URL

from heimdex.db import missing_privilege
from heimdex.errors import HeimdexError
from heimdex.ledger import backfills
from heimdex.logs import configure_logging
from heimdex.settings import (
    PoolMode,
    describe_url,
    detect_pool_mode,
    load_settings,
    log_options_or_defaults,
    normalize_url,
)
from heimdex_db import migrate as migrate_cmd
from heimdex_db import revision as revision_cmd
from heimdex_db import status as status_cmd
from heimdex_db.context import (
    DEFAULT_LOCK_WAIT,
    DEFAULT_RETRIES,
    DbContext,
    Tuning,
)
from heimdex_db.history import connect
from heimdex_db.lint.findings import RLS_BASELINE_REVISION
from heimdex_db.phases import PHASES, phase_of
from heimdex_db.revision import require_extra
from heimdex_db.settings import DEFAULT_LOCK_TIMEOUT, LOCK_TIMEOUT_ENV
from heimdex_db.supabase import artifacts as artifacts_cmd

F = TypeVar("F", bound=Callable[..., Any])

CONFIG_HELP = (
    "Alembic config (default: packages/common/alembic.ini in a checkout, else the installed"
    " package's own)."
)
URL_HELP = "Database URL (default: DATABASE_URL or PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE)."


def _config_option(f: F) -> F:
    return click.option(
        "-c",
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=CONFIG_HELP,
    )(f)


def _url_option(help_text: str = URL_HELP) -> Callable[[F], F]:
    return click.option(
        "--database-url", metavar="URL", default=None, help=help_text, callback=_note_url
    )


def _note_url(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    # Kept where DbGroup finds it, to name the role in a privilege error.
    ctx.find_root().meta["heimdex.database_url"] = value
    return value


def _lock_options(f: F) -> F:
    f = click.option(
        "--lock-timeout",
        default=DEFAULT_LOCK_TIMEOUT,
        envvar=LOCK_TIMEOUT_ENV,
        show_default=True,
        help="lock_timeout of every DDL statement: the session's, and the one revisions SET "
        "LOCAL (online.set_lock_timeout) and the online toolkit use; a statement that times "
        f"out is retried (env: {LOCK_TIMEOUT_ENV}).",
    )(f)
    f = click.option(
        "--retries",
        type=click.IntRange(min=0),
        default=DEFAULT_RETRIES,
        show_default=True,
        help="Retries of a revision that failed on lock_timeout (it was rolled back).",
    )(f)
    f = click.option(
        "--lock-wait",
        type=click.FloatRange(min=0),
        default=DEFAULT_LOCK_WAIT,
        show_default=True,
        help="Seconds to wait for another upgrader's migration lock.",
    )(f)
    return f


def _setup_logging() -> None:
    # Per-revision progress on stderr: aligned lines on a terminal, JSON lines for CI and
    # containers. Settings that do not load (a prod env without its secret) must not stop a
    # migration command, which needs none of them: the defaults then apply.
    configure_logging("db", **log_options_or_defaults())


CONTEXT_KEY = "heimdex.db_context"


def _context(
    config: Path | None,
    database_url: str | None = None,
    *,
    needs_database: bool = False,
    tuning: Tuning | None = None,
) -> DbContext:
    """The one `DbContext` of this invocation; the database defaults to the settings' URL."""
    url = None
    if needs_database:
        url = _session_url(database_url)
    ctx = DbContext.build(config, database_url=url, tuning=tuning)
    click.get_current_context().find_root().meta[CONTEXT_KEY] = ctx
    return ctx


def _session_url(database_url: str | None) -> URL:
    """The URL `heimdex db` connects to: `--database-url`, else the settings' URL, or their
    `HEIMDEX_SESSION_DATABASE_URL` when `DATABASE_URL` is a transaction pooler's. A transaction
    pooler's URL is refused: the migration lock is a session advisory lock, and a revision's
    `SET` would reach a server connection the next statement may not run on."""
    if database_url is not None:
        url = normalize_url(database_url)
        try:  # a migration needs no other setting: settings that do not load do not stop it
            mode = load_settings().pool_mode_of(url)
        except HeimdexError:
            mode = detect_pool_mode(url)
    else:
        settings = load_settings()
        url = settings.session_url or settings.sqlalchemy_url
        mode = settings.pool_mode_of(url)
    if mode is PoolMode.TRANSACTION:
        raise HeimdexError(
            f"{describe_url(url)} is a transaction pooler; heimdex db needs a session (its "
            "migration lock is a session advisory lock): pass --database-url with a direct or "
            "session-mode URL (Supabase: port 5432), or set HEIMDEX_SESSION_DATABASE_URL"
        )
    return url


class DbGroup(click.Group):
    """Maps a missing privilege anywhere below to one line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HeimdexError:
            raise
        except Exception as exc:
            meta = ctx.find_root().meta
            line = missing_privilege(
                exc, _role_of(meta.get("heimdex.database_url"), meta.get(CONTEXT_KEY))
            )
            if line is None:
                raise
            raise HeimdexError(line) from None


def _role_of(raw_url: str | None, built: DbContext | None) -> str | None:
    if raw_url:
        try:
            return normalize_url(raw_url).username
        except HeimdexError:
            return None
    url = built.database_url if built is not None else None
    return url.username if url is not None else None


@click.group(
    "db",
    cls=DbGroup,
    epilog="""\b
Examples:
  heimdex db status                 # where the database is against head
  heimdex db upgrade --database-url postgresql://postgres@localhost/heimdex
""",
)
def db() -> None:
    """Migrations of the ledger database: the Alembic playbook as one-line commands.

    Every command takes -c/--config (another alembic.ini, e.g. a copy of the history) and,
    where it touches a database, --database-url (default: the settings). Errors are one line
    and exit code 1. The plain `python -m alembic ...` commands keep working alongside.
    """
    _setup_logging()


@db.command(
    epilog="""\b
Exit codes:
  0  at head, models match the database
  1  error (database unreachable, bad config, ...)
  3  revisions pending (listed)
  4  at head, but the models differ from the database (drift, listed)
  5  the history has several heads (merge them)
  6  the database is at a revision this history does not know

\b
Examples:
  heimdex db status
  heimdex db status --database-url postgresql://postgres@localhost/heimdex
"""
)
@_config_option
@_url_option()
def status(*, config: Path | None, database_url: str | None) -> None:
    """Current revision against head: pending revisions, multiple heads, model drift."""
    result = status_cmd.status(_context(config, database_url, needs_database=True))
    click.echo(f"current: {', '.join(result.current) or 'base (empty database)'}")
    click.echo(f"head:    {', '.join(result.heads)}")
    if len(result.heads) > 1:
        click.echo("multiple heads: merge them (`alembic merge heads`) before upgrading")
    for rev in result.unknown:
        click.echo(f"unknown revision in the database: {rev} (another branch or checkout?)")
    for pending in result.pending:
        click.echo(f"pending: {pending.revision}  {pending.message}")
    for line in result.drift:
        click.echo(f"drift:   {line}")
    for backfill in result.backfills:
        click.echo(f"backfill: {backfill.describe()}")
    if result.code == 0:
        click.echo("up to date")
    sys.exit(int(result.code))


@db.group(
    "backfill",
    epilog="""\b
Examples:
  heimdex db status                                 # every backfill's progress
  heimdex db backfill throttle job_region --rows-per-second 5000
  heimdex db backfill finish job_region             # the rest now, in the foreground
""",
)
def backfill_group() -> None:
    """The backfills data revisions handed to the ledger (docs/migrations.md, "Backfills as
    jobs"): each runs as a `heimdex.backfill` job; `heimdex db status` shows their progress."""


def _progress_of(conn: Connection, name: str) -> backfills.Progress:
    with conn.begin():
        found = backfills.progress(conn, [name])
        known = [p.name for p in backfills.progress(conn)] if not found else []
    if not found:
        raise HeimdexError(
            f"no backfill is named {name!r} (backfills: {', '.join(known) or 'none'})"
        )
    return found[0]


@backfill_group.command(
    epilog="""\b
Examples:
  heimdex db backfill throttle job_region --rows-per-second 5000
  heimdex db backfill throttle job_region --pause-factor 1   # pause as long as each batch took
  heimdex db backfill throttle job_region                    # no throttle
"""
)
@click.argument("name")
@click.option(
    "--rows-per-second",
    type=click.FloatRange(min=0, min_open=True),
    help="Pause after each batch so the rate stays under this.",
)
@click.option(
    "--pause-factor",
    type=click.FloatRange(min=0),
    help="Pause this many times each batch's duration.",
)
@_config_option
@_url_option()
def throttle(
    name: str,
    *,
    rows_per_second: float | None,
    pause_factor: float | None,
    config: Path | None,
    database_url: str | None,
) -> None:
    """Set backfill NAME's throttle (both options unset: none); its next batch reads it."""
    ctx = _context(config, database_url, needs_database=True)
    with connect(ctx.url) as conn:
        _progress_of(conn, name)
        with conn.begin():
            backfills.set_throttle(
                conn, name, rows_per_second=rows_per_second, pause_factor=pause_factor
            )
        now = _progress_of(conn, name)
    click.echo(f"throttle of {name} set; {now.describe()}")


@backfill_group.command(
    epilog="""\b
Its job, if it runs meanwhile, takes turns with it batch by batch (no batch runs twice)
and ends when it finds the backfill done.

\b
Example:
  heimdex db backfill finish job_region && heimdex db upgrade
"""
)
@click.argument("name")
@click.option("--no-throttle", is_flag=True, help="Run the batches back to back, without pauses.")
@_config_option
@_url_option()
def finish(name: str, *, no_throttle: bool, config: Path | None, database_url: str | None) -> None:
    """Run backfill NAME's remaining batches now, from this process (as GitLab's finalize):
    for a contract revision that waits on it, or one whose job stopped."""
    ctx = _context(config, database_url, needs_database=True)
    with connect(ctx.url) as conn:
        _progress_of(conn, name)
        while True:
            with conn.begin():
                batch = backfills.run_batch(conn, name)
            if batch.finished:
                break
            if batch.pause and not no_throttle:
                time.sleep(batch.pause)
        done = _progress_of(conn, name)
    click.echo(done.describe())


def _report_migration(result: Any) -> None:
    if result.applied:
        click.echo(f"{', '.join(result.applied)} applied; now at {result.after or 'base'}")
    else:
        click.echo(f"nothing to do; at {result.after or 'base'}")


@db.command(
    epilog="""\b
Concurrency: every upgrade/downgrade takes a PostgreSQL advisory lock first, so
replicas starting together apply each revision once; the others wait (--lock-wait),
then find nothing to do. Exit codes: 0 done, 1 error (a failed revision names itself
and the statement; it was rolled back, the database stays at the previous revision).
Progress on stderr: each revision, long steps of online revisions (backfill rows,
index builds), and per revision how long it held ACCESS EXCLUSIVE locks. Online
revisions (docs/migrations.md §6) commit step by step and are resumable: after a
crash, the next upgrade continues where it stopped. HEIMDEX_BACKFILL_BATCH (rows per
batch, default 5000), HEIMDEX_LOCK_RETRY_DEADLINE (seconds, default 300) and
HEIMDEX_MAINTENANCE_WORK_MEM (sort memory of a concurrent index build, default 256MB)
tune them.

On a terminal each revision shows as [i/n] with its duration.

\b
Examples:
  heimdex db upgrade                # to head
  heimdex db upgrade +1 --lock-timeout 2s
"""
)
@click.argument("revision", default="head")
@click.option(
    "--phase",
    type=click.Choice(PHASES),
    default=None,
    help="Apply only the pending revisions of this phase (`phase = ...` in the revision), up "
    "to the first of another phase: `--phase expand` before a deploy.",
)
@_config_option
@_url_option()
@_lock_options
def upgrade(
    *,
    revision: str,
    phase: str | None,
    config: Path | None,
    database_url: str | None,
    lock_timeout: str,
    retries: int,
    lock_wait: float,
) -> None:
    """Apply revisions up to REVISION (default: head; also an id prefix or +N)."""
    tuning = Tuning(lock_timeout=lock_timeout, retries=retries, lock_wait=lock_wait)
    ctx = _context(config, database_url, needs_database=True, tuning=tuning)
    result = migrate_cmd.upgrade(ctx, revision, phase=phase)
    _report_migration(result)
    if result.held_back is not None:
        held = result.held_back
        click.echo(
            f"stopped before {held.revision} (phase {phase_of(held) or 'none'}, not {phase}): "
            "apply it when its phase comes, with `heimdex db upgrade`"
        )


@db.command(
    epilog="""\b
Data loss: before any revision runs, the tables and columns the downgrade drops
(read from its offline SQL) are counted on the database; if any holds rows
(non-null values for a column), each is listed on its own line and nothing is
changed, unless --allow-data-loss. The check needs the tooling extra
(pip install 'heimdex-db[tooling]'); --allow-data-loss does not.
Exit codes: 0 done, 1 error or refused. Serialised with upgrade by the same lock.

\b
Examples:
  heimdex db downgrade -1           # revert the last revision
  heimdex db downgrade base --allow-data-loss
""",
    context_settings={"ignore_unknown_options": True},
)
@click.argument("revision")
@click.option(
    "--allow-data-loss",
    is_flag=True,
    help="Drop tables and columns that hold data (they are listed in the log).",
)
@_config_option
@_url_option()
@_lock_options
def downgrade(
    *,
    revision: str,
    allow_data_loss: bool,
    config: Path | None,
    database_url: str | None,
    lock_timeout: str,
    retries: int,
    lock_wait: float,
) -> None:
    """Revert revisions down to REVISION (an id or prefix, base, or -N)."""
    tuning = Tuning(lock_timeout=lock_timeout, retries=retries, lock_wait=lock_wait)
    if allow_data_loss and not _has("pglast"):
        ctx = _context(config, database_url, needs_database=True, tuning=tuning)
        _report_migration(migrate_cmd.downgrade(ctx, revision))
        return
    require_extra("pglast", "heimdex db downgrade (its data-loss check)")
    # Imported here: the SQL parser is in the tooling extra, which `heimdex db upgrade` needs not.
    from heimdex_db import dataloss  # noqa: PLC0415

    ctx = _context(config, database_url, needs_database=True, tuning=tuning)
    _report_migration(dataloss.downgrade(ctx, revision, allow_data_loss=allow_data_loss))


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@db.command(
    epilog="""\b
Exit codes: 0 written, 1 error (database not at head for --autogenerate,
target directory not writable: pass --output-dir, ...).
Needs the tooling extra for formatting and enum support:
  uv sync (workspace) or pip install 'heimdex-db[tooling]'

\b
Examples:
  heimdex db revision -m "add job.region" --autogenerate
  heimdex db revision -m "backfill job.region" --output-dir /tmp
"""
)
@click.option("-m", "--message", required=True, help="What the revision does (its docstring).")
@click.option(
    "--autogenerate",
    is_flag=True,
    help="Compare the models with the database (which must be at head) and write the ops.",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the revision here instead of the versions directory (e.g. /tmp in a container).",
)
@click.option("--rev-id", default=None, help="Revision id to use instead of a random one.")
@_config_option
@_url_option("Database to compare against with --autogenerate (default: the settings).")
def revision(
    *,
    message: str,
    autogenerate: bool,
    output_dir: Path | None,
    rev_id: str | None,
    config: Path | None,
    database_url: str | None,
) -> None:
    """Write a new revision file (formatted with ruff) and print its path."""
    path = revision_cmd.revision(
        _context(config, database_url, needs_database=autogenerate),
        message,
        autogenerate=autogenerate,
        output_dir=output_dir,
        rev_id=rev_id,
    )
    click.echo(str(path))


@db.command(
    epilog="""\b
Files: supabase/migrations/NNNN_<slug>.sql, one per revision in history order
(plus one per statement that cannot run in a transaction). Each is exactly what
`python -m alembic upgrade <prev>:<rev> --sql` prints. Needs no database.
A file the Supabase CLI (>= 2.115.0) could not apply, where a statement that must run
outside a transaction (CREATE/DROP INDEX CONCURRENTLY, VACUUM, ...) shares the file
with others, is named on a line of its own by --check and never written.
Exit codes: 0 current/written, 1 error or (with --check) missing/stale/unappliable files.

\b
Examples:
  heimdex db sql                    # (re)write supabase/migrations/
  heimdex db sql --check            # in CI: fail on a stale artifact
"""
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Artifact directory (default: the repository's supabase/migrations; created).",
)
@click.option("--check", is_flag=True, help="Write nothing; fail naming missing or stale files.")
@_config_option
def sql(*, output_dir: Path | None, check: bool, config: Path | None) -> None:
    """Compile the Supabase SQL artifacts from the revision history."""
    result = artifacts_cmd.sql(_context(config), output_dir=output_dir, check=check)
    if check:
        click.echo(f"{len(result.unchanged)} artifact(s) in {result.directory} are current")
    else:
        click.echo(
            f"{result.directory}: {len(result.written)} written, {len(result.unchanged)} unchanged"
        )


@db.command(
    epilog="""\b
Checks: a single head; for every revision, upgrade -> downgrade -> upgrade with
the schema compared (on seeded rows, see heimdex_db.verify.seeds);
models equal to the database at head; Supabase artifacts current.
Never touches the configured database. Exit codes: 0 all good, 1 a check failed
(the revision and the schema diff are printed) or error.

\b
Examples:
  heimdex db verify                 # a throwaway cluster from the local binaries
  heimdex db verify --database-url postgresql://postgres@localhost/postgres
"""
)
@_config_option
@_url_option(
    "A server to use: a scratch database is created on it and dropped "
    "(default: a throwaway cluster from the local PostgreSQL binaries)."
)
@click.option(
    "--artifacts-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Supabase artifact directory to check (default: the repository's).",
)
@click.option("--skip-artifacts", is_flag=True, help="Do not check the Supabase artifacts.")
def verify(
    *,
    config: Path | None,
    database_url: str | None,
    artifacts_dir: Path | None,
    skip_artifacts: bool,
) -> None:
    """Verify the whole history in a throwaway database, as the playbook asks a human to."""
    require_extra("pglast", "heimdex db verify")
    # Imported here: verify reads downgrades with the SQL parser of the tooling extra.
    from heimdex_db.verify import command as verify_cmd  # noqa: PLC0415

    report = verify_cmd.verify(
        _context(config),
        server_url=database_url,
        artifacts_dir=artifacts_dir,
        check_artifacts=not skip_artifacts,
    )
    for line in report.passed:
        click.echo(f"ok: {line}")
    click.echo(f"verified {len(report.revisions)} revision(s) in {report.seconds:.1f}s")


@db.command(
    epilog=f"""\b
Rules: squawk (squawk-cli) on each revision's upgrade SQL, plus our own:
  enum-without-using, enum-not-dropped, index-not-concurrent,
  not-null-without-default, missing-lock-timeout (also: a strong-lock
  statement in an autocommit block), table-rewrite, validation-under-lock,
  backfill-in-one-statement (the online promise: see docs/migrations.md §6),
  table-without-rls (revisions after {RLS_BASELINE_REVISION}: a table created in
  public must get ENABLE ROW LEVEL SECURITY in the same revision),
  contract-in-expand (a revision with phase = "expand" drops, renames, or sets
  NOT NULL what the old code does not write), phase-unknown.
Acknowledge one finding with a comment on or just above the offending line:
  # heimdex-lint: ignore[rule-name] why this is safe here
Exit codes: 0 clean, 1 findings (file:line rule message) or error.
Needs the tooling extra: pip install 'heimdex-db[tooling]'.

\b
Examples:
  heimdex db lint                   # every revision
  heimdex db lint b8e2d4f6a1c3      # one revision (an id prefix works)
"""
)
@_config_option
@click.argument("revisions", nargs=-1)
def lint(*, config: Path | None, revisions: tuple[str, ...]) -> None:
    """Check revisions (default: all) for operations that lock or break a live database."""
    require_extra("pglast", "heimdex db lint")
    # Imported here: the parser is in the tooling extra, which `heimdex db upgrade` needs not.
    from heimdex_db.lint import command as lint_cmd  # noqa: PLC0415

    report = lint_cmd.lint(_context(config), revisions or None)
    for finding in report.findings:
        click.echo(finding.render())
    click.echo(
        f"{len(report.findings)} finding(s), {report.acknowledged} acknowledged, "
        f"{report.revisions} revision(s) checked",
        err=True,
    )
    if report.findings:
        sys.exit(1)


@db.command(
    epilog="""\b
The history from base to REV becomes one baseline revision with REV's id, built by
replaying it in a scratch database and dumping it with pg_dump (schema, grants, RLS
policies, functions, triggers, the rows the history inserts): <rev>_baseline_<rev>.py
and its .upgrade.sql/.downgrade.sql. The squashed revisions move to
<script_location>/squashed/REV/ (the old chain, with its own alembic.ini).
A database at REV or later upgrades unchanged; a fresh one runs the baseline; one
between base and REV is told to run `heimdex db upgrade REV -c <old chain ini>` first.
The baseline is applied to a second scratch database and must dump identically,
or nothing is written. Exit codes: 0 written, 1 error (nothing changed).

\b
Examples:
  heimdex db squash --to 7e5b3c8d1f20
  heimdex db squash --to 7e5b --database-url postgresql://postgres@localhost/postgres
"""
)
@click.option("--to", "to", required=True, metavar="REV", help="Last revision to squash.")
@_config_option
@_url_option(
    "A server to replay on: scratch databases are created on it and dropped "
    "(default: a throwaway cluster from the local PostgreSQL binaries)."
)
def squash(*, to: str, config: Path | None, database_url: str | None) -> None:
    """Replace the revisions up to REV by one baseline revision dumped from a replay."""
    # Imported here: squash replays on local PostgreSQL binaries (tooling, not deployment).
    from heimdex_db import squash as squash_cmd  # noqa: PLC0415

    result = squash_cmd.squash(_context(config), to, server_url=database_url)
    click.echo(f"{result.baseline}: baseline of {len(result.squashed)} revisions")
    click.echo(f"old chain: {result.old_chain}")
