"""`heimdex db upgrade` / `downgrade`: one revision at a time, under the migration lock."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path

from alembic import command
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, event, text
from sqlalchemy.exc import DBAPIError

from heimdex.db import missing_privilege
from heimdex.errors import HeimdexError
from heimdex_db.backfills import BackfillNotDone, check_done
from heimdex_db.context import DbContext
from heimdex_db.history import (
    connect,
    current_revisions,
    ordered_revisions,
    resolve_revision,
)
from heimdex_db.locking import is_lock_timeout, migration_lock
from heimdex_db.online import (
    LOCK_TIMEOUT_ATTRIBUTE,
    ONLINE_ATTRIBUTE,
    STRONG_LOCKS_ATTRIBUTE,
)
from heimdex_db.phases import PHASES, phase_of

logger = logging.getLogger(__name__)


class RevisionFailed(HeimdexError):
    """A revision's transaction failed and was rolled back."""


@dataclass(frozen=True)
class Step:
    script: Script
    direction: str  # "upgrade" | "downgrade"

    @property
    def target(self) -> str:
        if self.direction == "upgrade":
            return self.script.revision
        return str(self.script.down_revision or "base")

    def describe(self) -> str:
        arrow = (
            f"{self.script.down_revision or 'base'} -> {self.script.revision}"
            if self.direction == "upgrade"
            else f"{self.script.revision} -> {self.script.down_revision or 'base'}"
        )
        return f"{self.direction} {arrow} ({self.script.doc})"


@dataclass(frozen=True)
class MigrateResult:
    before: str | None
    after: str | None
    applied: list[str]
    # With a phase: the first pending revision of another phase, where the upgrade stopped.
    held_back: Script | None = None


def _index(history: list[Script], revision: str | None) -> int:
    """Position of `revision` in `history` (-1 for base)."""
    if revision is None:
        return -1
    for i, script in enumerate(history):
        if script.revision == revision:
            return i
    for script in history:
        if revision in getattr(script.module, "squashes", ()):
            old_chain = Path(script.path).parent / script.module.old_chain
            raise HeimdexError(
                f"the database is at {revision}, one of the revisions the baseline "
                f"{script.revision} replaced (`heimdex db squash`): bring it to "
                f"{script.revision} with the old chain first, then upgrade as usual: "
                f"heimdex db upgrade {script.revision} -c {os.path.normpath(old_chain)}"
            )
    raise HeimdexError(
        f"the database is at {revision}, which this history does not contain "
        "(a revision from another branch or a newer checkout?)"
    )


def _goal(history: list[Script], scripts: ScriptDirectory, target: str, here: int) -> int:
    """Position in `history` of the revision `target` names (-1: base); +N/-N count from here."""
    if re.fullmatch(r"[+-]\d+", target):
        return here + int(target)
    script = resolve_revision(scripts, target, also="head, base, +N, -N")
    if script is None:
        return -1
    return next(i for i, s in enumerate(history) if s.revision == script.revision)


def _single(revisions: tuple[str, ...]) -> str | None:
    if len(revisions) > 1:
        raise HeimdexError(
            f"the database is stamped with several revisions ({', '.join(revisions)}); "
            "this tool migrates single-head histories only"
        )
    return revisions[0] if revisions else None


def _failure_message(step: Step, exc: DBAPIError, now_at: str | None, role: str | None) -> str:
    orig = exc.orig
    reason = missing_privilege(exc, role) or (
        str(orig).strip().splitlines()[0] if orig is not None else str(exc)
    )
    hint = getattr(getattr(orig, "diag", None), "message_hint", None)
    statement = " ".join((exc.statement or "").split())
    if len(statement) > 200:
        statement = statement[:197] + "..."
    return (
        f"revision {step.script.revision} ({step.direction}) failed and was rolled back; "
        f"the database is still at {now_at or 'base'}: {reason}"
        + (f" (hint: {hint})" if hint else "")
        + f"; statement: {statement}"
    )


_HOLDS_ACCESS_EXCLUSIVE = (
    "SELECT string_agg(DISTINCT c.relname, ', ') FROM pg_locks l"
    " JOIN pg_class c ON c.oid = l.relation"
    " WHERE l.pid = pg_backend_pid() AND l.mode = 'AccessExclusiveLock' AND l.granted"
    " AND l.locktype = 'relation' AND c.relkind IN ('r', 'p')"
)


class StrongLockClock:
    """How long a revision held ACCESS EXCLUSIVE on a table, measured on its connection.

    In a transaction: from the start of the first statement after which this backend holds an
    ACCESS EXCLUSIVE lock on a table (read from pg_locks after every statement) to COMMIT or
    ROLLBACK, so it includes the wait for that lock. Statements run outside a transaction by
    the online toolkit are timed by the toolkit itself (each one's duration). Tables created by
    the revision count too: nobody else can be waiting on them, but pg_locks does not say so.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.held = 0.0
        self.tables: set[str] = set()
        self._since: float | None = None
        self._statement_started = 0.0

    def _before(self, *_args: object, **_kw: object) -> None:
        self._statement_started = time.monotonic()

    def _after(self, _conn: object, cursor: object, *_args: object, **_kw: object) -> None:
        raw = getattr(cursor, "connection", None)
        if self._since is not None or raw is None:
            return
        # psycopg: TransactionStatus.INTRANS == 2; outside a transaction the lock is gone.
        if int(getattr(raw.info, "transaction_status", 0)) != 2:
            return
        with raw.cursor() as probe:
            probe.execute(_HOLDS_ACCESS_EXCLUSIVE)
            row = probe.fetchone()
        if row and row[0]:
            self._since = self._statement_started
            self.tables.update(row[0].split(", "))

    def _end(self, *_args: object) -> None:
        if self._since is not None:
            self.held += time.monotonic() - self._since
            self._since = None

    def __enter__(self) -> StrongLockClock:
        event.listen(self.conn, "before_cursor_execute", self._before)
        event.listen(self.conn, "after_cursor_execute", self._after)
        event.listen(self.conn, "commit", self._end)
        event.listen(self.conn, "rollback", self._end)
        return self

    def __exit__(self, *exc: object) -> None:
        self._end()
        event.remove(self.conn, "before_cursor_execute", self._before)
        event.remove(self.conn, "after_cursor_execute", self._after)
        event.remove(self.conn, "commit", self._end)
        event.remove(self.conn, "rollback", self._end)


def _run_step(ctx: DbContext, step: Step, *, position: str = "") -> None:
    cfg, url = ctx.config, ctx.url
    lock_timeout, retries = ctx.tuning.lock_timeout, ctx.tuning.retries
    attempt = 0
    while True:
        attempt += 1
        started = time.monotonic()
        logger.info(
            "%s%s ...",
            position,
            step.describe(),
            extra={"action": f"db.{step.direction}.start", "revision": step.script.revision},
        )
        with connect(url) as conn:
            conn.execute(text(f"SET lock_timeout = '{lock_timeout}'"))
            conn.commit()
            cfg.attributes["connection"] = conn
            # The one lock_timeout: revisions read it through online.lock_timeout().
            cfg.attributes[LOCK_TIMEOUT_ATTRIBUTE] = lock_timeout
            cfg.attributes[STRONG_LOCKS_ATTRIBUTE] = []
            cfg.attributes[ONLINE_ATTRIBUTE] = False
            try:
                with StrongLockClock(conn) as clock:
                    if step.direction == "upgrade":
                        command.upgrade(cfg, step.target)
                    else:
                        command.downgrade(cfg, step.target)
                    if conn.in_transaction():
                        conn.commit()
            except DBAPIError as exc:
                if conn.in_transaction():
                    conn.rollback()
                if is_lock_timeout(exc) and attempt <= retries:
                    delay = ctx.tuning.retry_delay * attempt
                    logger.warning(
                        "%s: lock_timeout (%s) waiting for a lock; retry %d/%d in %.1fs",
                        step.script.revision,
                        lock_timeout,
                        attempt,
                        retries,
                        delay,
                        extra={"action": "db.lock_timeout.retry"},
                    )
                    time.sleep(delay)
                    continue
                now_at = _single(current_revisions(cfg, conn))
                message = _failure_message(step, exc, now_at, url.username)
                if is_lock_timeout(exc):
                    message += (
                        f" (gave up after {attempt} attempts: a long transaction holds a lock "
                        "this revision needs)"
                    )
                if cfg.attributes.pop(ONLINE_ATTRIBUTE, False):
                    message += (
                        "; its online steps that had committed stay, and the next upgrade "
                        "continues from them"
                    )
                raise RevisionFailed(message) from None
            except CommandError as exc:
                raise HeimdexError(f"{step.describe()}: {exc}") from None
            finally:
                cfg.attributes.pop("connection", None)
        online_holds = cfg.attributes.pop(STRONG_LOCKS_ATTRIBUTE, [])
        online_held = sum(seconds for _label, seconds in online_holds)
        longest = max(online_holds, key=lambda hold: hold[1], default=None)
        detail = f"; longest {longest[0]} {longest[1] * 1000:.0f}ms" if longest else ""
        logger.info(
            "%s%s done in %.2fs; strong locks held %.3fs (in transactions: %.3fs%s; online "
            "statements: %.3fs over %d%s)",
            position,
            step.script.revision,
            time.monotonic() - started,
            clock.held + online_held,
            clock.held,
            f" on {', '.join(sorted(clock.tables))}" if clock.tables else "",
            online_held,
            len(online_holds),
            detail,
            extra={
                "action": f"db.{step.direction}.done",
                "revision": step.script.revision,
                "strong_lock_s": clock.held + online_held,
            },
        )
        return


def _check_backfills(lock_conn: Connection, step: Step, applied: list[str]) -> None:
    """Refuse `step` while a backfill it requires is not done; the revisions before it stay."""
    if step.direction != "upgrade":
        return
    try:
        check_done(lock_conn, step.script)
    except BackfillNotDone as exc:
        if applied:
            raise BackfillNotDone(
                f"{', '.join(applied)} applied; now at {applied[-1]}, stopped: {exc}"
            ) from None
        raise
    finally:
        if lock_conn.in_transaction():
            lock_conn.rollback()


# Called under the migration lock, on the lock's connection, with the revisions a downgrade
# is about to revert (newest first), before any of them runs: it may refuse by raising.
DowngradeGuard = Callable[[Connection, list[Script]], None]


def _migrate(
    ctx: DbContext,
    direction: str,
    target: str,
    guard: DowngradeGuard | None = None,
    phase: str | None = None,
) -> MigrateResult:
    cfg, url = ctx.config, ctx.url
    scripts = ctx.scripts()
    history = ordered_revisions(scripts)
    with connect(url) as lock_conn, migration_lock(lock_conn, wait_seconds=ctx.tuning.lock_wait):
        # Read the position only once we hold the lock: another upgrader may just have moved it.
        before = _single(current_revisions(cfg, lock_conn))
        here = _index(history, before)
        goal = _goal(history, scripts, target, here)
        if direction == "upgrade" and goal < here:
            raise HeimdexError(
                f"the database is at {before}, past {target}: use `heimdex db downgrade {target}`"
            )
        if direction == "downgrade" and goal > here:
            raise HeimdexError(
                f"the database is at {before or 'base'}, before {target}: "
                f"use `heimdex db upgrade {target}`"
            )
        if not -1 <= goal < len(history):
            last = history[-1].revision
            raise HeimdexError(f"{target!r} is outside the history (base .. {last})")
        if direction == "upgrade":
            steps = [Step(s, "upgrade") for s in history[here + 1 : goal + 1]]
        else:
            steps = [Step(s, "downgrade") for s in reversed(history[goal + 1 : here + 1])]
        held_back = None
        if phase is not None:
            allowed = list(takewhile(lambda step: phase_of(step.script) == phase, steps))
            if len(allowed) < len(steps):
                held_back = steps[len(allowed)].script
            steps = allowed
        if guard is not None and steps:
            try:
                guard(lock_conn, [step.script for step in steps])
            finally:
                if lock_conn.in_transaction():
                    lock_conn.rollback()
        if not steps:
            logger.info("nothing to do: the database is at %s", before or "base")
        applied: list[str] = []
        for number, step in enumerate(steps, 1):
            _check_backfills(lock_conn, step, applied)
            _run_step(ctx, step, position=f"[{number}/{len(steps)}] " if len(steps) > 1 else "")
            applied.append(step.script.revision)
        after = _single(current_revisions(cfg, lock_conn))
    return MigrateResult(before=before, after=after, applied=applied, held_back=held_back)


def upgrade(ctx: DbContext, target: str = "head", *, phase: str | None = None) -> MigrateResult:
    """Apply the revisions up to `target`, each in its own transaction, under the migration lock.

    `target` is a revision id or a unique prefix, `head` or `+N`. A revision failing on
    `lock_timeout` is retried `ctx.tuning.retries` times (it was rolled back, so the database is
    at the previous revision); any other failure stops with `RevisionFailed`. With `phase`
    (`heimdex_db.phases.PHASES`), only the pending revisions of that phase are applied, up to
    the first of another phase (or of none): `held_back` in the result.
    """
    if phase is not None and phase not in PHASES:
        raise HeimdexError(f"phase must be one of {', '.join(PHASES)}, not {phase!r}")
    return _migrate(ctx, "upgrade", target, phase=phase)


def downgrade(ctx: DbContext, target: str, *, guard: DowngradeGuard | None = None) -> MigrateResult:
    """Revert revisions down to `target` (a revision, `base` or `-N`), like `upgrade`.

    `guard` sees the revisions to revert before the first one runs and may refuse by raising
    (`heimdex_db.dataloss.downgrade` refuses one that would delete data).
    """
    return _migrate(ctx, "downgrade", target, guard)
