"""Online schema changes from inside an Alembic revision: no writer waits on a long lock.

Use from a revision:

    from heimdex_db.online import (
        add_check, add_columns, backfill, create_index, online, set_lock_timeout,
    )

    def upgrade() -> None:
        set_lock_timeout()
        with online():
            add_columns("job", "ADD COLUMN IF NOT EXISTS status_new job_status")
            backfill("job", pending="status_new IS NULL",
                     set="status_new = status::job_status")
            add_check("job", "ck_job__status_new_not_null", "status_new IS NOT NULL")
            create_index("idx_job__status_new", "job", "(status_new)")

Inside `online()` every statement commits on its own (Alembic's autocommit block), so:

- a statement that needs a strong lock (`ddl`, `add_columns`, the NOT VALID half of
  `add_check`) runs in a DO block that starts with `SET LOCAL lock_timeout` (the one value of
  `lock_timeout()`); online, a lock timeout is retried with growing, jittered waits up to
  `retry_deadline()` seconds, each wait logged, and its duration is recorded as strong-lock time;
- `backfill` updates about `batch_size()` rows per statement (a range of pages, in physical
  order), each committed, selecting only rows matching `pending`: an upgrade killed half-way
  skips what is done and continues. Most rows take a plain `UPDATE ... SET` of their pages,
  rows that need more (e.g. an event) the `steps` over a locked `batch`. Offline (`--sql`) it
  is one DO block that COMMITs after every batch;
- VALIDATE CONSTRAINT and CREATE/DROP INDEX CONCURRENTLY take SHARE UPDATE EXCLUSIVE, which
  blocks no reader and no writer: they wait without a lock_timeout. An INVALID index left by a
  killed concurrent build is dropped and built again. A build sorts with
  `maintenance_work_mem()` (HEIMDEX_MAINTENANCE_WORK_MEM, default 256MB) in its session.

Every operation is safe to run again, so the revision as a whole is: the next upgrade after a
crash redoes only what is missing.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from alembic import op
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from heimdex.errors import HeimdexError
from heimdex_db.settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LOCK_TIMEOUT,
    DURATION,
    MigrationSettings,
)

logger = logging.getLogger(__name__)

# Keys in Alembic's Config.attributes: `heimdex db upgrade` sets the first and reads the second;
# the settings are read from the environment once per run.
LOCK_TIMEOUT_ATTRIBUTE = "heimdex.lock_timeout"
SETTINGS_ATTRIBUTE = "heimdex.migration_settings"
STRONG_LOCKS_ATTRIBUTE = "heimdex.strong_locks"
ONLINE_ATTRIBUTE = "heimdex.online"  # set once a revision entered online()
LOCK_NOT_AVAILABLE = "55P03"
# A batch whose pages still hold pending rows runs again (the application changed a row while
# the batch ran); this many times in a row means the batch's statement cannot finish them.
MAX_BATCH_AGAIN = 3
# `backfill(make_room=True)`: a batch's pages are swept this many times, the first sweeps each
# taking the rows whose line pointer number is i modulo ROOM_SWEEPS (i = 1, 2, ...), the last
# the rest (see _sweeps).
ROOM_SWEEPS = 3


def _attributes() -> dict[str, Any]:
    config = op.get_context().config
    return config.attributes if config is not None else {}


def _offline() -> bool:
    return bool(op.get_context().as_sql)


def settings() -> MigrationSettings:
    """This run's settings: read from the environment once and kept in Alembic's attributes."""
    attributes = _attributes()
    found = attributes.get(SETTINGS_ATTRIBUTE)
    if not isinstance(found, MigrationSettings):
        found = attributes[SETTINGS_ATTRIBUTE] = MigrationSettings.from_env()
    return found


def lock_timeout() -> str:
    """The lock_timeout every revision and `heimdex db upgrade` use: one value.

    `heimdex db upgrade --lock-timeout` when given, else `HEIMDEX_LOCK_TIMEOUT` (online only),
    else 5s. Offline (`--sql`, the Supabase artifacts) it is the default unless a caller set it,
    so the compiled files do not depend on the environment.
    """
    configured = _attributes().get(LOCK_TIMEOUT_ATTRIBUTE)
    value = str(
        configured or (None if _offline() else settings().lock_timeout) or DEFAULT_LOCK_TIMEOUT
    )
    if not DURATION.match(value):
        raise HeimdexError(f"lock_timeout must look like 5s, 500ms or 1min, not {value!r}")
    return value


def batch_size() -> int:
    return settings().backfill_batch


def retry_deadline() -> float:
    return settings().lock_retry_deadline


def maintenance_work_mem() -> str:
    """The sort memory of a concurrent index build (its session only): a build that sorts in
    memory instead of in temporary files takes about 15% less time on 1M rows."""
    return settings().maintenance_work_mem


def set_lock_timeout() -> None:
    """First statement of a revision's upgrade()/downgrade() (the lint checks it)."""
    op.execute(f"SET LOCAL lock_timeout = '{lock_timeout()}'")


def _bind() -> Connection:
    return op.get_bind()


def _is_lock_timeout(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    return isinstance(exc, DBAPIError) and getattr(orig, "sqlstate", None) == LOCK_NOT_AVAILABLE


def _record_strong(label: str, seconds: float) -> None:
    _attributes().setdefault(STRONG_LOCKS_ATTRIBUTE, []).append((label, seconds))


def _run_with_retries(sql: str, label: str, *, strong: bool) -> None:
    """Online: execute `sql` (autocommit), retrying lock timeouts with jittered growing waits."""
    conn = _bind()
    deadline = time.monotonic() + retry_deadline()
    attempt = 0
    while True:
        attempt += 1
        started = time.monotonic()
        try:
            conn.exec_driver_sql(sql)
        except DBAPIError as exc:
            if not _is_lock_timeout(exc):
                raise
            wait = min(30.0, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)  # noqa: S311 (jitter, not a secret)
            if time.monotonic() + wait > deadline:
                logger.warning(
                    "%s: lock_timeout (%s), giving up after %d attempts",
                    label,
                    lock_timeout(),
                    attempt,
                    extra={"action": "db.online.lock_gave_up"},
                )
                raise
            logger.warning(
                "%s: lock_timeout (%s) waiting for a lock; attempt %d, next in %.2fs",
                label,
                lock_timeout(),
                attempt,
                wait,
                extra={"action": "db.online.lock_retry"},
            )
            time.sleep(wait)
            continue
        if strong:
            _record_strong(label, time.monotonic() - started)
        return


@contextmanager
def online() -> Iterator[None]:
    """Run the block outside the revision's transaction, one committed statement at a time."""
    _attributes()[ONLINE_ATTRIBUTE] = True
    with op.get_context().autocommit_block():
        yield


def _emit(sql: str, label: str, *, strong: bool) -> None:
    if _offline():
        op.execute(sql)
    else:
        _run_with_retries(sql, label, strong=strong)


def ddl(statements: str | list[str], *, label: str | None = None) -> None:
    """Statements that take a strong lock, in one short transaction under `lock_timeout()`.

    Keep them catalog-only (no rewrite, no scan): they block the table while they run.
    """
    body = [statements] if isinstance(statements, str) else statements
    inner = "\n".join(f"    {s.strip().rstrip(';')};" for s in body)
    sql = f"DO $ddl$\nBEGIN\n    SET LOCAL lock_timeout = '{lock_timeout()}';\n{inner}\nEND\n$ddl$"
    _emit(sql, label or body[0].split("\n")[0][:80], strong=True)


def add_columns(table: str, *clauses: str) -> None:
    """`ALTER TABLE table ADD COLUMN IF NOT EXISTS ...`: nullable or constant default only."""
    ddl(f"ALTER TABLE {table} " + ", ".join(clauses), label=f"add columns to {table}")


def _constraint_exists(name: str) -> bool:
    return bool(
        _bind()
        .execute(text("SELECT 1 FROM pg_constraint WHERE conname = :n"), {"n": name})
        .scalar()
    )


def _weak(sql: str, label: str, *, sorts: bool = False) -> None:
    """A SHARE UPDATE EXCLUSIVE step: no reader or writer waits on it, so no lock_timeout.

    `sorts` (an index build): with `maintenance_work_mem()` for this statement."""
    if _offline():
        op.execute(sql)
        return
    conn = _bind()
    started = time.monotonic()
    conn.exec_driver_sql("SET lock_timeout = 0")
    if sorts:
        conn.exec_driver_sql(f"SET maintenance_work_mem = '{maintenance_work_mem()}'")
    try:
        conn.exec_driver_sql(sql)
    finally:
        conn.exec_driver_sql(f"SET lock_timeout = '{lock_timeout()}'")
        if sorts:
            conn.exec_driver_sql("RESET maintenance_work_mem")
    logger.info("%s: %.2fs", label, time.monotonic() - started)


def not_valid_constraint(table: str, name: str, definition: str) -> str:
    """The guarded `ADD CONSTRAINT ... NOT VALID`, as a statement for `ddl()`."""
    return (
        f"IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = '{name}') THEN\n"
        f"        ALTER TABLE {table} ADD CONSTRAINT {name} {definition} NOT VALID;\n"
        "    END IF"
    )


def validate_constraint(table: str, *names: str) -> None:
    """VALIDATE CONSTRAINT: scans under SHARE UPDATE EXCLUSIVE (readers and writers go on)."""
    clauses = ", ".join(f"VALIDATE CONSTRAINT {name}" for name in names)
    _weak(f"ALTER TABLE {table} {clauses}", f"validate {', '.join(names)}")


def _add_constraint(table: str, name: str, definition: str, *, validate: bool) -> None:
    ddl(not_valid_constraint(table, name, definition), label=f"add {name} NOT VALID")
    if validate:
        validate_constraint(table, name)


def add_check(table: str, name: str, condition: str, *, validate: bool = True) -> None:
    """CHECK ... NOT VALID (catalog only), then VALIDATE (a scan that blocks no writer).

    With `validate=False` the check already applies to every new or updated row; call
    `validate_constraint` once the existing rows are fixed (e.g. after a backfill).
    """
    _add_constraint(table, name, f"CHECK ({condition})", validate=validate)


def add_foreign_key(
    table: str,
    name: str,
    columns: str,
    ref_table: str,
    ref_columns: str,
    *,
    ondelete: str | None = None,
    validate: bool = True,
) -> None:
    """FOREIGN KEY ... NOT VALID, then VALIDATE (SHARE UPDATE EXCLUSIVE on `table`)."""
    on_delete = f" ON DELETE {ondelete}" if ondelete else ""
    _add_constraint(
        table,
        name,
        f"FOREIGN KEY ({columns}) REFERENCES {ref_table} ({ref_columns}){on_delete}",
        validate=validate,
    )


def _index_state(name: str) -> str | None:
    """'valid', 'invalid' or None (absent)."""
    row = (
        _bind()
        .execute(
            text(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE c.relname = :n AND c.relnamespace = 'public'::regnamespace"
            ),
            {"n": name},
        )
        .first()
    )
    if row is None:
        return None
    return "valid" if row[0] else "invalid"


def create_index(
    name: str, table: str, columns: str, *, unique: bool = False, where: str | None = None
) -> None:
    """CREATE INDEX CONCURRENTLY; an INVALID index of that name (a killed build) is rebuilt.

    `columns` is the parenthesised column list, e.g. "(org_id, created_at DESC)".
    """
    sql = f"CREATE {'UNIQUE ' if unique else ''}INDEX CONCURRENTLY {name} ON {table} {columns}" + (
        f" WHERE {where}" if where else ""
    )
    if _offline():
        # A file applied once, in order: nothing can be left behind by an earlier run.
        op.execute(sql)
        return
    state = _index_state(name)
    if state == "valid":
        logger.info("index %s already built", name)
        return
    if state == "invalid":
        logger.warning(
            "index %s is INVALID (a concurrent build was interrupted): dropping and rebuilding",
            name,
            extra={"action": "db.online.invalid_index"},
        )
        _weak(f"DROP INDEX CONCURRENTLY IF EXISTS {name}", f"drop invalid {name}")
    logger.info("building index %s concurrently ...", name, extra={"action": "db.online.index"})
    _weak(sql, f"index {name} built", sorts=True)


def drop_index(name: str) -> None:
    """DROP INDEX CONCURRENTLY IF EXISTS."""
    _weak(f"DROP INDEX CONCURRENTLY IF EXISTS {name}", f"drop index {name}")


def replace_index(
    old: str,
    new: str,
    table: str,
    columns: str,
    *,
    unique: bool = False,
    where: str | None = None,
) -> None:
    """Build `new` concurrently, then drop `old` concurrently: queries always have one."""
    create_index(new, table, columns, unique=unique, where=where)
    drop_index(old)


def _pages(table: str) -> int:
    value = (
        _bind()
        .execute(
            text(
                "SELECT pg_relation_size(CAST(:t AS regclass))"
                " / current_setting('block_size')::bigint"
            ),
            {"t": table},
        )
        .scalar()
    )
    return int(value or 0)


def _rows_per_page(table: str) -> float:
    """The planner's estimate, or a count if `table` was never analysed."""
    row = (
        _bind()
        .execute(
            text("SELECT reltuples, relpages FROM pg_class WHERE oid = CAST(:t AS regclass)"),
            {"t": table},
        )
        .one()
    )
    tuples, pages = float(row[0]), int(row[1])
    if tuples <= 0 or pages <= 0:
        tuples = float(_bind().execute(text(f"SELECT count(*) FROM {table}")).scalar() or 0)
        pages = _pages(table)
    return tuples / pages if pages else 1.0


def _probe(table: str, lo: int, pending: str) -> str:
    """The first row at or after page `lo` matching `pending` (its ctid), if any.

    One TID range scan in physical order that stops at the first match: a stretch with nothing
    to do (already backfilled before a crash, or the new row versions the backfill itself
    appended at the end of the table) is read once, sequentially, without a batch per page range.
    """
    return f"SELECT ctid::text FROM {table} WHERE ctid >= '({lo},0)'::tid AND ({pending}) LIMIT 1"


def _page_of(tid: object) -> int:
    return int(str(tid).strip("()").split(",")[0])


def _first_pending_page(table: str, lo: int, pending: str) -> int | None:
    tid = _bind().exec_driver_sql(_probe(table, lo, pending)).scalar()
    return None if tid is None else _page_of(tid)


def _backfill_block(table: str, label: str, batch: str) -> None:
    """Offline: the batches as one DO block (PostgreSQL 11+: outside a transaction block it may
    COMMIT between batches); `batch` is one batch's statement, over pages lo to lo + k."""
    op.execute(
        "DO $backfill$\nDECLARE\n    n bigint;\n    done bigint := 0;\n"
        "    lo bigint := 0;\n    k bigint;\nBEGIN\n"
        f"    SELECT greatest(1, {DEFAULT_BATCH_SIZE} / greatest(1, (reltuples"
        " / greatest(relpages, 1))::bigint)) INTO k\n"
        f"      FROM pg_class WHERE oid = '{table}'::regclass;\n"
        "    LOOP\n"
        f"        EXIT WHEN lo >= pg_relation_size('{table}')"
        " / current_setting('block_size')::bigint;\n"
        f"        {batch}\n          INTO n;\n"
        "        done := done + n;\n"
        "        lo := lo + k;\n"
        f"        RAISE NOTICE USING MESSAGE = '{label}: ' || done || ' rows';\n"
        "        COMMIT;\n    END LOOP;\nEND\n$backfill$"
    )


def _sweeps(
    batch_sql: Callable[..., str], lo: int, step: int, probe: str, label: str, *, make_room: bool
) -> tuple[int, int | None] | None:
    """One batch over pages lo to lo + step, then the probe for the next: (rows changed, page of
    the first pending row at or after lo), or None on lock_timeout.

    A row updated on a full page gets its new version on another page, with a new entry in
    every index of the table; a HOT update (same page, no indexed column changed) adds none.
    A freshly loaded table has full pages (fillfactor 100). With `make_room` the pages are swept
    ROOM_SWEEPS times, each sweep committed: the first takes a third of each page's rows (those
    whose line pointer number is 1 modulo 3), which move; once committed, the next sweep's read
    of the page prunes their old versions, so most of the second third fits on the page
    (HOT), and the same again for the last third. At 1M rows 59% of the updates were HOT (none
    without), the table ended 196 MB instead of 282 MB, and the backfill took about a fifth
    less CPU. Pruning needs the old versions to be dead to every snapshot: behind a long
    transaction the sweeps just update without HOT, as one sweep would.

    The sweeps, a COMMIT after each, and the probe go to the server as one query string (the
    simple query protocol runs them in order, each COMMIT ending a transaction): one round trip
    per batch instead of one per statement, which on a busy machine or a distant server is
    most of a batch's overhead.
    """
    lo_tid, hi_tid = f"'({lo},0)'::tid", f"'({lo + step},0)'::tid"
    sweeps = [
        f" AND mod(((ctid::text::point)[1])::int, {ROOM_SWEEPS}) = {i}"
        for i in range(1, ROOM_SWEEPS if make_room else 1)
    ]
    sql = "".join(
        f"{batch_sql(lo_tid, hi_tid, sweep=sweep)};\nCOMMIT;\n" for sweep in [*sweeps, ""]
    )
    cursor = _bind().connection.cursor()
    try:
        cursor.execute(sql + probe)
        rows: list[tuple[Any, ...] | None] = []
        while True:
            if cursor.description is not None:
                rows.append(cursor.fetchone())
            if not cursor.nextset():
                break
    except Exception as exc:
        state = getattr(exc, "sqlstate", None) or getattr(
            getattr(exc, "orig", None), "sqlstate", None
        )
        if state != LOCK_NOT_AVAILABLE:
            raise
        logger.warning("%s: lock_timeout on a batch, retrying", label)
        time.sleep(random.uniform(0.1, 0.5))  # noqa: S311 (jitter)
        return None
    finally:
        cursor.close()
    *counts, first = rows
    changed = sum(int(row[0]) for row in counts if row is not None)
    return changed, None if first is None else _page_of(first[0])


def backfill(
    table: str,
    *,
    pending: str,
    steps: str | None = None,
    set: str | None = None,
    steps_where: str | None = None,
    columns: tuple[str, ...] = (),
    key: str = "id",
    recheck: bool = True,
    make_room: bool = True,
    label: str | None = None,
) -> int:
    """Update the rows matching `pending` in batches of about `batch_size()` rows, each committed.

    Batches walk the table in physical order, a range of pages at a time (a TID range scan):
    each page is read once, sequentially, instead of once per row in key order, which on a
    table bigger than the cache is several times faster. A batch is one statement (so one
    transaction) over the pending rows of its pages:

    - `set`: `UPDATE table SET <set>` of those rows, computed from the row itself: no join back
      by `key` (an index probe per row) and no separate row lock (a WAL record per row), about
      a third less work per row than an UPDATE ... FROM batch;
    - `steps`: further CTEs (`name AS (UPDATE ... FROM batch ...)`, e.g. an UPDATE and an
      INSERT of what it changed) over the CTE `batch`, which holds the rows (`key` and
      `columns`) locked FOR UPDATE.

    With both, `steps_where` splits the rows: those it is true for take the `steps`, the others
    (`IS NOT TRUE`, so NULL counts as false) the `set`. So the common case is a plain UPDATE and
    only the rows that need more (an event, a log) pay for it.

    Every row of the batch must end up with `pending` false. After each batch the walk goes on
    from the first pending row at or after the batch's first page (`_first_pending_page`, a
    sequential read that stops there): a row the application changed meanwhile so that it now
    matches `steps_where` is taken by the next batch, and statements that leave rows pending
    stop the backfill with an error after `MAX_BATCH_AGAIN` tries instead of looping. Stretches
    with nothing to do (done by a killed run, or the new row versions the updates append at the
    end of the table) are read once, without a batch for them; the walk ends when no pending
    row is left at or after it. A restarted backfill starts over at page 0 and skips what is
    done. With `recheck`, a second walk catches rows that became pending behind the cursor;
    pass False when nothing can (e.g. a trigger fills new rows). With `make_room` (online) each
    batch is three statements, a third of each page's rows at a time, so that most updates
    find room on their own page and are HOT (no new index entries: see `_sweeps`); pass False
    when the update changes an indexed column (no update can be HOT then).
    Returns the number of rows updated (online; 0 offline).
    """
    if steps is None and set is None:
        raise HeimdexError("backfill needs steps, set, or both")
    if steps is not None and set is not None and steps_where is None:
        raise HeimdexError("backfill with both steps and set needs steps_where (which rows)")
    label = label or f"backfill {table}"
    cols = "".join(f", {c}" for c in columns)

    def batch_sql(lo: str, hi: str, *, sweep: str = "") -> str:
        rows = f"ctid >= {lo} AND ctid < {hi} AND ({pending}){sweep}"
        ctes, counts = [], []
        if steps is not None:
            only = f" AND ({steps_where})" if set is not None else ""
            ctes += [
                f"batch AS (SELECT {key}{cols} FROM {table} WHERE {rows}{only} FOR UPDATE)",
                steps.strip(),
            ]
            counts.append("(SELECT count(*) FROM batch)")
        if set is not None:
            others = f" AND ({steps_where}) IS NOT TRUE" if steps is not None else ""
            ctes.append(
                f"backfill_set AS (UPDATE {table} SET {set}\n WHERE {rows}{others} RETURNING 1)"
            )
            counts.append("(SELECT count(*) FROM backfill_set)")
        return "WITH " + ",\n".join(ctes) + "\nSELECT " + " + ".join(counts)

    if _offline():
        _backfill_block(
            table,
            label,
            batch_sql("('(' || lo || ',0)')::tid", "('(' || lo + k || ',0)')::tid"),
        )
        return 0
    size = batch_size()
    per_page = _rows_per_page(table)
    step = max(1, int(size / max(per_page, 1.0)))
    total = int(per_page * _pages(table))
    done = 0
    started = time.monotonic()
    last_log = 0.0
    logger.info(
        "%s: batches of %d pages (about %d rows; about %d rows in %s) ...",
        label,
        step,
        int(step * per_page),
        total,
        table,
        extra={"action": "db.online.backfill.start"},
    )
    for _pass in range(2 if recheck else 1):
        lo, again = 0, -1  # again: batches in a row that left rows of their pages pending
        first = _first_pending_page(table, 0, pending)
        while first is not None:
            again = again + 1 if first < lo + step else 0
            if again > MAX_BATCH_AGAIN:
                raise HeimdexError(
                    f"{label}: rows of pages {lo}-{lo + step - 1} are still pending"
                    f" ({pending}) after {again} batches over them: the batch's statements"
                    " must make it false for every row they take"
                )
            lo = first
            result = _sweeps(
                batch_sql, lo, step, _probe(table, lo, pending), label, make_room=make_room
            )
            if result is None:  # lock_timeout: that batch again
                again = -1
                continue
            n, first = result
            done += n
            now = time.monotonic()
            if now - last_log >= 1.0:
                last_log = now
                pages = max(_pages(table), 1)
                logger.info(
                    "%s: %d rows, page %d of %d (%.0f%%), %.1fs",
                    label,
                    done,
                    min(lo + step, pages),
                    pages,
                    100 * min(lo + step, pages) / pages,
                    now - started,
                    extra={"action": "db.online.backfill.progress", "rows": done},
                )
    logger.info(
        "%s: %d rows in %.1fs",
        label,
        done,
        time.monotonic() - started,
        extra={"action": "db.online.backfill.done", "rows": done},
    )
    return done
