"""`heimdex db upgrade/downgrade`: serialised, fail-fast on locks, rolled back on failure."""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import subprocess
import threading

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from heimdex.errors import HeimdexError
from heimdex_db.context import DbContext, Tuning
from heimdex_db.locking import MIGRATION_LOCK, WAITING_APPLICATION_NAME
from heimdex_db.migrate import RevisionFailed, downgrade, upgrade
from tests.conftest import DatabaseFactory
from tests.dbutil import execute, scalar, version_of

from .conftest import (
    HEIMDEX,
    VERSION_TABLE,
    HistoryCopy,
    clean_env,
    head,
    heimdex,
    revisions_of,
    url_arg,
)

# Alembic's own version table, created before Alembic does where an older checkout kept it
# (`public`: env.py's prelude moves it, trigger and all), with a trigger recording every stamp:
# each revision applied exactly once means exactly one transition per revision.
TRANSITION_LOG = """
CREATE TABLE alembic_version (
    version_num VARCHAR(32) NOT NULL,
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
CREATE TABLE version_transitions (
    n bigserial PRIMARY KEY,
    old_version text,
    new_version text,
    backend_pid integer NOT NULL DEFAULT pg_backend_pid()
);
CREATE FUNCTION log_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO version_transitions (old_version, new_version)
    VALUES (CASE WHEN TG_OP = 'UPDATE' THEN OLD.version_num END, NEW.version_num);
    RETURN NEW;
END $$;
CREATE TRIGGER log_version AFTER INSERT OR UPDATE ON alembic_version
    FOR EACH ROW EXECUTE FUNCTION log_version();
"""


# The default lock_timeout (5s) is what production waits; these tests only need it to expire.
TEST_LOCK_TIMEOUT = "500ms"

WAITERS = (
    f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{WAITING_APPLICATION_NAME}'"
)


@pytest.mark.slow
def test_four_upgraders_started_at_once_apply_each_revision_exactly_once(
    empty_db_url: URL,
) -> None:
    execute(empty_db_url, TRANSITION_LOG)
    # Hold the migration lock until all four wait on it, so that they really start together
    # (interpreter start-up alone would otherwise spread them out).
    holder_engine = create_engine(empty_db_url, poolclass=NullPool)
    holder = holder_engine.connect()
    holder.execute(
        text("SELECT pg_advisory_lock(:a, :b)"), {"a": MIGRATION_LOCK[0], "b": MIGRATION_LOCK[1]}
    )
    procs = [
        subprocess.Popen(
            [str(HEIMDEX), "db", "upgrade", "--database-url", url_arg(empty_db_url)],
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    while scalar(empty_db_url, WAITERS) < 4:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        threading.Event().wait(0.05)
    holder.close()  # the session ends, and with it the lock
    holder_engine.dispose()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs

    revisions = revisions_of()
    engine = create_engine(empty_db_url)
    with engine.connect() as conn:
        # The table moved, so the trigger did too: it is still what recorded the stamps.
        assert conn.execute(text("SELECT to_regclass('public.alembic_version')")).scalar() is None
        triggers = conn.execute(
            text(f"SELECT count(*) FROM pg_trigger WHERE tgrelid = '{VERSION_TABLE}'::regclass")
        )
        assert triggers.scalar() == 1
        transitions = conn.execute(
            text("SELECT old_version, new_version, backend_pid FROM version_transitions ORDER BY n")
        ).all()
        jobs_tables = conn.execute(text("SELECT count(*) FROM pg_class WHERE relname = 'job'"))
        assert jobs_tables.scalar() == 1
    engine.dispose()
    assert [(t.old_version, t.new_version) for t in transitions] == list(
        zip([None, *revisions[:-1]], revisions, strict=True)
    )
    # One process did the work; the three others found nothing to do.
    stdout = [out for out, _err in outputs]
    assert sum(f"{', '.join(revisions)} applied" in s for s in stdout) == 1
    assert sum(f"nothing to do; at {revisions[-1]}" in s for s in stdout) == 3


@pytest.mark.slow
def test_progress_names_each_revision_and_its_duration(empty_db_url: URL) -> None:
    proc = heimdex("db", "upgrade", "--database-url", url_arg(empty_db_url))
    assert proc.returncode == 0, proc.stderr
    assert "upgrade base -> 001_job_ledger_init (job ledger init" in proc.stderr
    assert "3af4686817cc done in " in proc.stderr
    assert f"now at {head()}" in proc.stdout

    # Not a terminal (CI, a container): JSON lines a collector parses, one per step, in order.
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    done = [r for r in records if r.get("action") == "db.upgrade.done"]
    revisions = revisions_of()
    assert [r["revision"] for r in done] == revisions
    assert str(done[0]["msg"]).startswith(f"[1/{len(revisions)}] ")
    assert {r["process"] for r in records} == {"db"}


@pytest.mark.slow
def test_progress_on_a_terminal_is_aligned_lines_in_colour(empty_db_url: URL) -> None:
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [str(HEIMDEX), "db", "upgrade", "--database-url", url_arg(empty_db_url)],
        env={k: v for k, v in clean_env().items() if k not in ("NO_COLOR", "HEIMDEX_LOG_FORMAT")},
        stdin=child,
        stdout=child,
        stderr=child,
    )
    os.close(child)
    screen = b""
    try:
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO once the command has exited and closed the terminal
                break
            if not chunk:
                break
            screen += chunk
    finally:
        proc.wait(timeout=60)
        os.close(main)
    text = screen.decode()
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert proc.returncode == 0, plain
    assert "\x1b[" in text
    count = len(revisions_of())
    for number, rev in enumerate(revisions_of(), 1):
        assert re.search(
            rf"^\d\d:\d\d:\d\d\.\d{{3}} INFO +db +\[{number}/{count}\] {rev} done in ",
            plain,
            re.M,
        ), plain
    assert not [line for line in plain.splitlines() if line.lstrip().startswith("{")], plain


@pytest.mark.slow
def test_downgrade_and_upgrade_by_relative_steps_and_prefixes(db_url: URL) -> None:
    revisions = revisions_of()
    ctx = DbContext.build(database_url=db_url)  # one context, reused by every command
    assert downgrade(ctx, "-1").after == revisions[-2]
    proc = heimdex("db", "downgrade", "base", "--database-url", url_arg(db_url))
    assert proc.returncode == 0, proc.stderr
    assert scalar(db_url, "SELECT to_regclass('public.job')") is None
    assert version_of(db_url) is None
    assert upgrade(ctx, "001").applied == ["001_job_ledger_init"]
    assert upgrade(ctx, "+1").after == "3af4686817cc"
    assert upgrade(ctx, "4c2f").applied == ["4c2f9a1e7b3d"]
    assert upgrade(ctx).applied == revisions[3:]


def test_bad_targets_are_clear_and_change_nothing(db_url: URL) -> None:
    ctx = DbContext.build(database_url=db_url)
    with pytest.raises(HeimdexError, match="'nope' is not a revision of this history"):
        upgrade(ctx, "nope")
    with pytest.raises(HeimdexError, match="use `heimdex db downgrade 001_job_ledger_init`"):
        upgrade(ctx, "001_job_ledger_init")
    with pytest.raises(HeimdexError, match="--lock-timeout must look like"):
        upgrade(
            DbContext.build(
                database_url=db_url, tuning=Tuning(lock_timeout="5 seconds; DROP TABLE job")
            )
        )
    assert version_of(db_url) == head()


@pytest.mark.slow
def test_bad_revision_ids_exit_non_zero_with_what_to_type_instead(db_url: URL) -> None:
    proc = heimdex("db", "upgrade", "nope", "--database-url", url_arg(db_url))
    assert proc.returncode == 1
    assert "error: 'nope' is not a revision of this history" in proc.stderr
    assert "known: 001_job_ledger_init, 3af4686817cc" in proc.stderr
    assert "head, base, +N, -N" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = heimdex("db", "lint", "nope")
    assert proc.returncode == 1
    assert "error: 'nope' is not a revision of this history" in proc.stderr
    assert version_of(db_url) == head()


def test_a_prefix_of_two_revisions_is_ambiguous_and_changes_nothing(
    history: HistoryCopy, db_url: URL
) -> None:
    history.add_revision("ab0000000001", history.head, "pass")
    history.add_revision("ab0000000002", "ab0000000001", "pass")
    ctx = DbContext.build(history.ini, database_url=db_url)
    with pytest.raises(
        HeimdexError, match=r"'ab' is ambiguous \(Multiple revisions start with 'ab'"
    ):
        upgrade(ctx, "ab")
    assert version_of(db_url) == head()
    assert upgrade(ctx, "ab0000000001").applied == ["ab0000000001"]


@pytest.mark.slow
def test_a_failing_revision_is_named_with_its_statement_and_rolled_back(
    history: HistoryCopy, db_url: URL
) -> None:
    at = history.head
    history.add_revision(
        "c0ffee000001",
        at,
        """
        op.execute("SET LOCAL lock_timeout = '5s'")
        op.add_column("job", sa.Column("region", sa.Text()))
        op.execute("UPDATE job SET region = 'eu' WHERE 1 / 0 = 1")
        """,
    )
    execute(db_url, "INSERT INTO job (org_id, type) VALUES (gen_random_uuid(), 'x')")
    proc = heimdex("db", "upgrade", "-c", history.ini, "--database-url", url_arg(db_url))
    assert proc.returncode == 1
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: revision c0ffee000001 (upgrade) failed and was rolled back")
    assert f"the database is still at {at}" in message
    assert "division by zero" in message
    assert "statement: UPDATE job SET region = 'eu' WHERE 1 / 0 = 1" in message
    assert "Traceback" not in proc.stderr
    # Transactional DDL: the column added before the failure is gone too.
    assert (
        scalar(
            db_url,
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_name = 'job' AND column_name = 'region'",
        )
        == 0
    )


def _hold_lock_on_job(url: URL, released: threading.Event, holding: threading.Event) -> None:
    engine = create_engine(url)
    with engine.connect() as conn:
        conn.execute(text("SELECT count(*) FROM job"))  # ACCESS SHARE until the transaction ends
        holding.set()
        released.wait(60)
        conn.rollback()
    engine.dispose()


def _waiting_on_lock(url: URL) -> bool:
    return bool(
        scalar(
            url,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()",
        )
    )


def test_lock_timeout_fails_fast_and_leaves_the_previous_revision(
    db_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 3af4686817cc is online: its statements retry by themselves until this deadline.
    monkeypatch.setenv("HEIMDEX_LOCK_RETRY_DEADLINE", "1")
    downgrade(DbContext.build(database_url=db_url), "001_job_ledger_init")
    release, holding = threading.Event(), threading.Event()
    blocker = threading.Thread(target=_hold_lock_on_job, args=(db_url, release, holding))
    blocker.start()
    try:
        holding.wait(10)
        with pytest.raises(RevisionFailed) as info:
            upgrade(
                DbContext.build(
                    database_url=db_url, tuning=Tuning(retries=0, lock_timeout=TEST_LOCK_TIMEOUT)
                )
            )
    finally:
        release.set()
        blocker.join()
    message = str(info.value)
    assert "revision 3af4686817cc (upgrade) failed" in message
    assert "lock timeout" in message
    assert "still at 001_job_ledger_init" in message
    assert "the next upgrade continues from them" in message
    assert version_of(db_url) == "001_job_ledger_init"


@pytest.mark.slow
def test_lock_timeout_is_retried_once_the_long_transaction_ends(
    db_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    downgrade(DbContext.build(database_url=db_url), "001_job_ledger_init")
    release, holding = threading.Event(), threading.Event()
    blocker = threading.Thread(target=_hold_lock_on_job, args=(db_url, release, holding))
    blocker.start()

    def release_after_first_timeout() -> None:
        # Wait for the revision to queue behind the blocker, then for its lock_timeout.
        while not _waiting_on_lock(db_url):
            threading.Event().wait(0.05)
        while _waiting_on_lock(db_url):
            threading.Event().wait(0.05)
        release.set()

    releaser = threading.Thread(target=release_after_first_timeout)
    holding.wait(10)
    releaser.start()
    try:
        with caplog.at_level(logging.WARNING, logger="heimdex"):
            result = upgrade(
                DbContext.build(
                    database_url=db_url,
                    tuning=Tuning(retries=3, retry_delay=0.2, lock_timeout=TEST_LOCK_TIMEOUT),
                )
            )
    finally:
        release.set()
        blocker.join()
        releaser.join()
    assert result.applied == revisions_of()[1:]
    # A transactional revision is retried whole ("retry 1/3"); an online one's statement is
    # retried by itself ("attempt 1, next in ...").
    assert any(
        "lock_timeout" in r.getMessage()
        and ("retry 1/3" in r.getMessage() or "attempt 1, next in" in r.getMessage())
        for r in caplog.records
    )


@pytest.mark.slow
def test_lock_timeout_reaches_online_statements_which_retry_with_logged_waits(
    create_database: DatabaseFactory,
) -> None:
    url = create_database()
    upgrade(DbContext.build(database_url=url), "001_job_ledger_init")
    execute(url, "INSERT INTO job (org_id, type) VALUES (gen_random_uuid(), 't')")
    holder = create_engine(url, poolclass=NullPool)
    with holder.connect() as conn:
        conn.execute(text("SELECT count(*) FROM job"))  # holds ACCESS SHARE until rollback
        proc = heimdex(
            "db", "upgrade", "3af4686817cc", "--database-url", url_arg(url),
            "--lock-timeout", "200ms", "--retries", "0",
            env=clean_env(HEIMDEX_LOCK_RETRY_DEADLINE="3"),
        )  # fmt: skip
        conn.rollback()
    holder.dispose()
    assert proc.returncode == 1, proc.stderr
    waits = [line for line in proc.stderr.splitlines() if "waiting for a lock; attempt" in line]
    assert len(waits) >= 2, proc.stderr
    assert all("lock_timeout (200ms)" in line for line in waits)
    assert version_of(url) == "001_job_ledger_init"
    # Once the lock is free, the same command finishes what the first run left.
    proc = heimdex("db", "upgrade", "3af4686817cc", "--database-url", url_arg(url))
    assert proc.returncode == 0, proc.stderr
    assert "strong locks held" in proc.stderr
    assert version_of(url) == "3af4686817cc"
