"""`heimdex db verify`: the whole history checked in a throwaway database.

What the playbook asks a reviewer to do by hand, for every revision: upgrade, downgrade,
upgrade again, with the schema compared each time, on seeded rows rather than empty tables.
Then: the models match the database at head, and the Supabase artifacts are current.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from alembic.script import Script
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, OperationalError

from heimdex.db import connection_error
from heimdex.errors import HeimdexError
from heimdex.settings import normalize_url
from heimdex_db import dataloss, migrate
from heimdex_db.config import ARTIFACT_DIR
from heimdex_db.context import DbContext
from heimdex_db.history import connect, inspect_with_env, ordered_revisions
from heimdex_db.localpg import LocalPostgres, create_database
from heimdex_db.status import model_drift
from heimdex_db.supabase import artifacts
from heimdex_db.verify.schema import Snapshot, render_diff, snapshot
from heimdex_db.verify.seeds import seeds_for

logger = logging.getLogger(__name__)


class VerifyFailed(HeimdexError):
    """A check of `verify` failed; the message names the revision and shows the diff."""


@dataclass
class VerifyReport:
    revisions: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    seconds: float = 0.0


@contextmanager
def scratch_database(server_url: URL | str | None) -> Iterator[URL]:
    """A new, empty database: on a throwaway cluster, or created (and dropped) on a server."""
    if server_url is None:
        cluster = LocalPostgres.throwaway()
        logger.info("starting a throwaway PostgreSQL cluster")
        cluster.start()
        try:
            yield cluster.url()
        finally:
            cluster.destroy()
        return
    url = normalize_url(server_url)
    name = f"heimdex_verify_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            create_database(conn, name)
    except OperationalError as exc:
        admin.dispose()
        raise connection_error(url, exc) from None
    except DBAPIError as exc:
        admin.dispose()
        raise HeimdexError(
            f"cannot create a scratch database on {url.host}: {exc.orig}; "
            "--database-url needs a role allowed to CREATE DATABASE"
        ) from None
    logger.info("scratch database %s created", name)
    try:
        yield url.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _snapshot(url: URL) -> Snapshot:
    with connect(url) as conn:
        return snapshot(conn)


def _seed(url: URL, script: Script | None) -> None:
    statements = seeds_for(script)
    if not statements:
        return
    where = script.revision if script is not None else "base"
    with connect(url) as conn:
        try:
            for statement in statements:
                conn.exec_driver_sql(statement)
            conn.commit()
        except DBAPIError as exc:
            raise VerifyFailed(
                f"seed rows for {where} do not fit the schema at {where}: "
                f"{str(exc.orig).splitlines()[0]} (update heimdex_db.verify.seeds)"
            ) from None


def _step(what: str, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
    try:
        fn(*args, **kwargs)
    except HeimdexError as exc:
        raise VerifyFailed(f"{what}: {exc}") from None


def stairway(ctx: DbContext, history: list[Script]) -> list[str]:
    """Up, seed, down, up for every revision in order, the schema compared at each turn.

    On `ctx`'s database, which must be empty; no retries: nothing else holds a lock there.
    """
    url = ctx.url
    passed = []
    # A baseline (`heimdex db squash`) serves fresh databases only: the rows of a database
    # from before the history (upstream's tables) are for the old chain's first revision.
    squashes: tuple[str, ...] = getattr(history[0].module, "squashes", ()) if history else ()
    if not squashes:
        _seed(url, None)
    for number, script in enumerate(history, 1):
        rev = script.revision
        started = time.monotonic()
        before = _snapshot(url)
        _step(
            f"upgrade to {rev} failed on seeded rows",
            migrate.upgrade,
            ctx,
            rev,
        )
        after_up = _snapshot(url)
        _seed(url, script)
        down_to = script.down_revision or "base"
        # The seeded rows are deleted on purpose: the check that refuses it still runs.
        _step(
            f"downgrade of {rev} failed on seeded rows",
            dataloss.downgrade,
            ctx,
            str(down_to),
            allow_data_loss=True,
        )
        after_down = _snapshot(url)
        if after_down != before:
            raise VerifyFailed(
                f"downgrade of {rev} does not restore the schema before it "
                f"(something left behind or missing):\n{render_diff(before, after_down)}"
            )
        _step(
            f"re-upgrade to {rev} failed after its downgrade",
            migrate.upgrade,
            ctx,
            rev,
        )
        again = _snapshot(url)
        if again != after_up:
            raise VerifyFailed(
                f"re-upgrade of {rev} after its downgrade gives a different schema:\n"
                + render_diff(after_up, again)
            )
        elapsed = time.monotonic() - started
        logger.info(
            "[%d/%d] %s: up, down, up on seeded rows, schema identical (%.2fs)",
            number,
            len(history),
            rev,
            elapsed,
            extra={"action": "db.verify.revision", "revision": rev},
        )
        passed.append(f"{rev} up/down/up with seeded rows")
    return passed


def verify(
    ctx: DbContext,
    *,
    server_url: URL | str | None = None,
    artifacts_dir: Path | str | None = None,
    check_artifacts: bool = True,
) -> VerifyReport:
    """Run every check on `ctx`'s history; raise `VerifyFailed` at the first that fails.

    `server_url` names a server on which a scratch database is created and dropped; without it
    a throwaway cluster is started from the local PostgreSQL binaries. The context's database,
    if it has one, is never used.
    """
    started = time.monotonic()
    report = VerifyReport()
    scripts = ctx.scripts()
    heads = scripts.get_heads()
    if len(heads) != 1:
        raise VerifyFailed(
            f"the history has {len(heads)} heads ({', '.join(sorted(heads))}): merge them"
        )
    history = ordered_revisions(scripts)
    report.revisions = [s.revision for s in history]
    report.passed.append(f"single head {heads[0]}")

    with scratch_database(server_url) as url:
        scratch = ctx.on(url, tuning=replace(ctx.tuning, retries=0))
        report.passed += stairway(scratch, history)
        with connect(url) as conn:
            drift = inspect_with_env(scratch.config, conn, model_drift)
        if drift:
            raise VerifyFailed(
                f"the models differ from the database at head {heads[0]} "
                "(write a revision for them: heimdex db revision --autogenerate): "
                + "; ".join(drift)
            )
        report.passed.append("models match the database at head")

    if check_artifacts:
        directory = Path(artifacts_dir) if artifacts_dir is not None else ARTIFACT_DIR
        problems = artifacts.check_artifacts(artifacts.compile_artifacts(ctx.config), directory)
        if problems:
            raise VerifyFailed(
                "Supabase artifacts out of date (run `heimdex db sql`): " + "; ".join(problems)
            )
        report.passed.append(f"Supabase artifacts in {directory} are current")
    report.seconds = time.monotonic() - started
    return report
