"""`heimdex db downgrade` refuses to delete data unless told: each table and column counted."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import URL

from heimdex_db import dataloss
from heimdex_db.context import DbContext
from heimdex_db.migrate import upgrade
from tests.dbutil import execute, scalar, schema_of, version_of

from .conftest import HistoryCopy, heimdex, url_arg

LOCK = "op.execute(\"SET LOCAL lock_timeout = '5s'\")"

# A table and a column, dropped by the downgrade the Alembic way (op.*), and a second table
# dropped with raw SQL inside a DO block: all three are what the downgrade's SQL says.
REGIONS_UP = f"""
{LOCK}
op.create_table("region", sa.Column("code", sa.Text(), primary_key=True))
op.execute("ALTER TABLE region ENABLE ROW LEVEL SECURITY")
op.create_table("region_alias", sa.Column("alias", sa.Text(), primary_key=True))
op.execute("ALTER TABLE region_alias ENABLE ROW LEVEL SECURITY")
op.add_column("job", sa.Column("region", sa.Text()))
"""
REGIONS_DOWN = f"""
{LOCK}
op.drop_column("job", "region")
op.execute("DO $$ BEGIN DROP TABLE IF EXISTS region_alias; END $$")
op.drop_table("region")
"""

JOB = (
    "INSERT INTO job (org_id, type, status, params, request_fingerprint, region) "
    "VALUES (gen_random_uuid(), 'drive_ingest', 'queued', '{{}}', repeat('c', 64), {region})"
)


def _at_regions(history: HistoryCopy, url: URL) -> str:
    before = history.head
    history.add_revision("regions00001", before, REGIONS_UP, REGIONS_DOWN)
    upgrade(DbContext.build(history.ini, database_url=url))
    return before


@pytest.mark.slow  # the whole history upgraded
def test_a_downgrade_that_would_delete_data_lists_each_item_and_changes_nothing(
    history: HistoryCopy, empty_db_url: URL
) -> None:
    _at_regions(history, empty_db_url)
    execute(
        empty_db_url,
        "INSERT INTO region VALUES ('eu'), ('us'), ('ap')",
        "INSERT INTO region_alias VALUES ('europe')",
        JOB.format(region="'eu'"),
        JOB.format(region="'us'"),
        JOB.format(region="NULL"),
    )
    schema = schema_of(empty_db_url)

    proc = heimdex(
        "db", "downgrade", "-1", "-c", history.ini, "--database-url", url_arg(empty_db_url)
    )

    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert any("would delete data; nothing was changed" in line for line in lines), proc.stderr
    assert any("--allow-data-loss" in line for line in lines), proc.stderr
    items = [line.strip() for line in lines if line.startswith("  ")]
    assert sorted(items) == [
        "column job.region: 2 non-null value(s) (dropped by the downgrade of regions00001)",
        "table region: 3 row(s) (dropped by the downgrade of regions00001)",
        "table region_alias: 1 row(s) (dropped by the downgrade of regions00001)",
    ], proc.stderr
    assert version_of(empty_db_url) == "regions00001"
    assert schema_of(empty_db_url) == schema
    assert scalar(empty_db_url, "SELECT count(*) FROM region") == 3


@pytest.mark.slow  # the whole history upgraded
def test_allow_data_loss_drops_them(history: HistoryCopy, empty_db_url: URL) -> None:
    before = _at_regions(history, empty_db_url)
    execute(empty_db_url, "INSERT INTO region VALUES ('eu')", JOB.format(region="'eu'"))

    proc = heimdex(
        "db",
        "downgrade",
        "-1",
        "--allow-data-loss",
        "-c",
        history.ini,
        "--database-url",
        url_arg(empty_db_url),
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert version_of(empty_db_url) == before
    assert "deleting table region: 1 row(s)" in proc.stderr
    assert scalar(empty_db_url, "SELECT to_regclass('region') IS NULL") is True


@pytest.mark.slow  # the whole history upgraded
def test_a_downgrade_dropping_only_empty_tables_and_null_columns_needs_no_flag(
    history: HistoryCopy, empty_db_url: URL
) -> None:
    before = _at_regions(history, empty_db_url)
    execute(empty_db_url, JOB.format(region="NULL"))

    result = dataloss.downgrade(DbContext.build(history.ini, database_url=empty_db_url), "-1")

    assert result.after == before


@pytest.mark.slow  # the whole history upgraded
def test_counted_across_several_revisions_a_column_with_its_table_once(
    history: HistoryCopy, empty_db_url: URL
) -> None:
    before = _at_regions(history, empty_db_url)
    history.add_revision(
        "regions00002",
        "regions00001",
        f"""
        {LOCK}
        op.add_column("region", sa.Column("name", sa.Text()))
        """,
        f"""
        {LOCK}
        op.drop_column("region", "name")
        """,
    )
    ctx = DbContext.build(history.ini, database_url=empty_db_url)
    upgrade(ctx)
    execute(empty_db_url, "INSERT INTO region VALUES ('eu', 'Europe')")

    with pytest.raises(dataloss.DataLossRefused) as refused:
        dataloss.downgrade(ctx, before)

    assert str(refused.value).splitlines()[1:] == [
        "  table region: 1 row(s) (dropped by the downgrade of regions00001)"
    ]
    assert version_of(empty_db_url) == "regions00002"
