"""`backfill(set=..., steps=..., steps_where=...)` of the online toolkit, on a revision of its own.

The plain `UPDATE ... SET` takes the common rows, the `steps` the rows matching `steps_where`
(locked in `batch`); every row ends up done. A batch whose statements leave rows pending stops
the upgrade with an error instead of walking the same pages forever.
"""

from __future__ import annotations

import pytest
from sqlalchemy.engine import URL

from heimdex.errors import HeimdexError
from heimdex_db.context import DbContext
from heimdex_db.migrate import upgrade
from tests.dbutil import execute, scalar, version_of

from .conftest import HistoryCopy

HEADER = "from heimdex_db.online import backfill, ddl, online, set_lock_timeout\n"
ROWS = 3000


def _rows(url: URL) -> None:
    execute(
        url,
        "INSERT INTO job (org_id, type, priority)"
        f" SELECT gen_random_uuid(), 't', mod(g, 10) FROM generate_series(1, {ROWS}) AS g",
    )


def test_set_takes_the_common_rows_and_steps_the_others(
    history: HistoryCopy, db_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEIMDEX_BACKFILL_BATCH", "250")
    _rows(db_url)
    history.add_revision(
        "bf0000000001",
        history.head,
        """
        set_lock_timeout()
        with online():
            ddl("ALTER TABLE job ADD COLUMN IF NOT EXISTS region_new varchar(16)")
            backfill(
                "job",
                pending="region_new IS NULL",
                set="region_new = 'plain'",
                steps_where="priority = 3",
                columns=("priority",),
                steps="s AS (UPDATE job j SET region_new = 'step-' || b.priority"
                " FROM batch b WHERE j.id = b.id)",
            )
        """,
        header=HEADER,
    )
    upgrade(DbContext.build(history.ini, database_url=db_url))
    assert version_of(db_url) == "bf0000000001"
    by_region = scalar(
        db_url,
        "SELECT string_agg(region || ':' || n, ' ' ORDER BY region) FROM"
        " (SELECT coalesce(region_new, 'NULL') || '/' || (priority = 3) AS region, count(*) AS n"
        "    FROM job GROUP BY 1) AS r",
    )
    assert by_region == f"plain/false:{ROWS - ROWS // 10} step-3/true:{ROWS // 10}"


def test_a_batch_that_leaves_its_rows_pending_stops_the_upgrade(
    history: HistoryCopy, db_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEIMDEX_BACKFILL_BATCH", "250")
    _rows(db_url)
    head = history.head
    history.add_revision(
        "bf0000000002",
        head,
        """
        set_lock_timeout()
        with online():
            ddl("ALTER TABLE job ADD COLUMN IF NOT EXISTS region_new varchar(16)")
            backfill("job", pending="region_new IS NULL", set="region_new = NULL")
        """,
        header=HEADER,
    )
    with pytest.raises(HeimdexError, match="still pending"):
        upgrade(DbContext.build(history.ini, database_url=db_url))
    assert version_of(db_url) == head


@pytest.mark.parametrize(
    "case",
    [
        ("HEIMDEX_BACKFILL_BATCH", "0", "HEIMDEX_BACKFILL_BATCH must be a positive integer"),
        ("HEIMDEX_LOCK_RETRY_DEADLINE", "soon", "HEIMDEX_LOCK_RETRY_DEADLINE must be a number"),
        ("HEIMDEX_MAINTENANCE_WORK_MEM", "lots", "HEIMDEX_MAINTENANCE_WORK_MEM must look like"),
        ("HEIMDEX_LOCK_TIMEOUT", "5 seconds", "HEIMDEX_LOCK_TIMEOUT must look like"),
    ],
)
def test_a_malformed_tuning_variable_is_one_line_and_changes_nothing(
    history: HistoryCopy,
    db_url: URL,
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[str, str, str],
) -> None:
    variable, value, message = case
    monkeypatch.setenv(variable, value)
    head = history.head
    history.add_revision(
        "bf0000000003",
        head,
        """
        set_lock_timeout()
        with online():
            ddl("ALTER TABLE job ADD COLUMN IF NOT EXISTS region_new varchar(16)")
            backfill("job", pending="region_new IS NULL", set="region_new = 'x'")
        """,
        header=HEADER,
    )
    with pytest.raises(HeimdexError, match=message) as raised:
        upgrade(DbContext.build(history.ini, database_url=db_url))
    assert "\n" not in str(raised.value)
    assert version_of(db_url) == head
    assert (
        scalar(
            db_url,
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_name = 'job' AND column_name = 'region_new'",
        )
        == 0
    )
