"""`upgrade --phase expand` stops at a contract, lint keeps expand additive."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import URL

from heimdex_db.context import DbContext
from heimdex_db.migrate import upgrade
from tests.dbutil import scalar, version_of

from .conftest import HistoryCopy, heimdex, url_arg

pytestmark = pytest.mark.slow  # histories upgraded from the base

LOCK = "op.execute(\"SET LOCAL lock_timeout = '5s'\")"


def _phased(history: HistoryCopy) -> str:
    """expand (add job.region), contract (drop job.result_url), expand (add job.zone)."""
    head = history.head
    history.add_revision(
        "phase0000001",
        head,
        f"""
        {LOCK}
        op.add_column("job", sa.Column("region", sa.Text()))
        """,
        f"""
        {LOCK}
        op.drop_column("job", "region")
        """,
        header='phase = "expand"',
    )
    history.add_revision(
        "phase0000002",
        "phase0000001",
        f"""
        {LOCK}
        op.drop_column("job", "region")
        """,
        f"""
        {LOCK}
        op.add_column("job", sa.Column("region", sa.Text()))
        """,
        header='phase = "contract"',
    )
    history.add_revision(
        "phase0000003",
        "phase0000002",
        f"""
        {LOCK}
        op.add_column("job", sa.Column("zone", sa.Text()))
        """,
        f"""
        {LOCK}
        op.drop_column("job", "zone")
        """,
        header='phase = "expand"',
    )
    return head


def test_upgrade_phase_expand_applies_the_expand_revisions_up_to_the_first_contract(
    history: HistoryCopy, empty_db_url: URL
) -> None:
    head = _phased(history)
    upgrade(DbContext.build(history.ini, database_url=empty_db_url), head)

    proc = heimdex(
        "db",
        "upgrade",
        "--phase",
        "expand",
        "-c",
        history.ini,
        "--database-url",
        url_arg(empty_db_url),
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "phase0000001 applied; now at phase0000001" in proc.stdout
    assert (
        "stopped before phase0000002 (phase contract, not expand): apply it when its phase "
        "comes, with `heimdex db upgrade`"
    ) in proc.stdout
    assert version_of(empty_db_url) == "phase0000001"
    # After the deploy: the rest.
    rest = heimdex("db", "upgrade", "-c", history.ini, "--database-url", url_arg(empty_db_url))
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert version_of(empty_db_url) == "phase0000003"
    assert (
        scalar(
            empty_db_url,
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_name = 'job' AND column_name IN ('region', 'zone')",
        )
        == 1
    )


def test_upgrade_phase_expand_applies_nothing_before_a_revision_of_no_phase(
    history: HistoryCopy, empty_db_url: URL
) -> None:
    _phased(history)
    # The newest revision of this repository's history that declares no phase (the ones
    # after it are expand revisions).
    head = "f3c1a8e5b7d9"
    before = history.revisions[history.revisions.index(head) - 1]
    upgrade(DbContext.build(history.ini, database_url=empty_db_url), before)

    proc = heimdex(
        "db",
        "upgrade",
        "--phase",
        "expand",
        "-c",
        history.ini,
        "--database-url",
        url_arg(empty_db_url),
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"stopped before {head} (phase none, not expand)" in proc.stdout
    assert version_of(empty_db_url) == before


def test_an_unknown_phase_option_is_refused(history: HistoryCopy, empty_db_url: URL) -> None:
    proc = heimdex(
        "db",
        "upgrade",
        "--phase",
        "shrink",
        "-c",
        history.ini,
        "--database-url",
        url_arg(empty_db_url),
    )
    assert proc.returncode == 2
    assert "'shrink' is not one of 'expand', 'data', 'contract'" in proc.stderr
    assert version_of(empty_db_url) is None


EXPAND_BREAKING = f"""
{LOCK}
op.drop_column("job", "result")
op.alter_column("job", "stage", new_column_name="step")
op.alter_column("job", "type", nullable=False)
op.add_column("job", sa.Column("region", sa.Text(), nullable=False, server_default="eu"))
op.add_column("job", sa.Column("zone", sa.Text(), nullable=False))
op.execute("DO $$ BEGIN DROP TABLE IF EXISTS job_outbox; END $$")
"""


def _contract_lines(proc_stdout: str) -> list[str]:
    return [
        line.split(" contract-in-expand ", 1)[1].split(":", 1)[0]
        for line in proc_stdout.splitlines()
        if " contract-in-expand " in line
    ]


def test_lint_refuses_each_contract_operation_in_an_expand_revision(history: HistoryCopy) -> None:
    history.add_revision("expand000001", history.head, EXPAND_BREAKING, header='phase = "expand"')

    proc = heimdex("db", "lint", "-c", history.ini, "expand000001")

    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _contract_lines(proc.stdout) == [
        "this expand revision drops column job.result",
        "this expand revision renames job.stage to step",
        "this expand revision sets NOT NULL on job.type, which the old code may not write",
        "this expand revision adds NOT NULL column job.zone without a default, which the old "
        "code does not write",
        "this expand revision drops table job_outbox",
    ], proc.stdout
    assert 'move it to a revision with phase = "contract"' in proc.stdout


def test_the_same_operations_in_a_contract_revision_are_not_refused_for_their_phase(
    history: HistoryCopy,
) -> None:
    history.add_revision("contract0001", history.head, EXPAND_BREAKING, header='phase = "contract"')

    proc = heimdex("db", "lint", "-c", history.ini, "contract0001")

    assert _contract_lines(proc.stdout) == [], proc.stdout


def test_lint_names_an_unknown_phase(history: HistoryCopy) -> None:
    path = history.add_revision(
        "phase0000009",
        history.head,
        f"""
        {LOCK}
        op.add_column("job", sa.Column("region", sa.Text()))
        """,
        header='phase = "expnad"',
    )

    proc = heimdex("db", "lint", "-c", history.ini, "phase0000009")

    assert proc.returncode == 1
    line = next(
        n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("phase")
    )
    assert (
        f"{path}:{line} phase-unknown phase 'expnad' is not one of expand, data, contract"
        in proc.stdout
    )
