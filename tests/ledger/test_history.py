"""The Alembic history as a whole: shape, stairway, drift against the models."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from heimdex.models import Base
from heimdex_db.config import alembic_config, script_directory
from heimdex_db.verify.schema import render_diff, without_history_only
from tests.dbutil import schema_of, version_of

PLAYBOOK_REVISIONS = ["001_job_ledger_init", "3af4686817cc"]


def test_history_has_a_single_head_and_the_playbook_revisions_in_order() -> None:
    scripts = script_directory(alembic_config())
    assert len(scripts.get_heads()) == 1
    order = [rev.revision for rev in reversed(list(scripts.walk_revisions()))]
    assert order[:2] == PLAYBOOK_REVISIONS
    hardening = scripts.get_revision("3af4686817cc")
    assert hardening is not None
    assert hardening.down_revision == "001_job_ledger_init"
    assert hardening.doc == "hardening: job ledger enums/indexes/idempotency"


@pytest.mark.slow
def test_stairway_every_revision_up_down_up_leaves_identical_schema(empty_db_url: URL) -> None:
    cfg = alembic_config(database_url=empty_db_url)
    scripts = script_directory(cfg)
    for rev in reversed(list(scripts.walk_revisions())):
        before = schema_of(empty_db_url)
        command.upgrade(cfg, rev.revision)
        after_up = schema_of(empty_db_url)
        command.downgrade(cfg, rev.down_revision or "base")  # type: ignore[arg-type]
        assert schema_of(empty_db_url) == before, (
            f"downgrade of {rev.revision} left the schema changed:\n"
            + render_diff(before, schema_of(empty_db_url))
        )
        command.upgrade(cfg, rev.revision)
        assert schema_of(empty_db_url) == after_up, (
            f"re-upgrade of {rev.revision} differs:\n"
            + render_diff(after_up, schema_of(empty_db_url))
        )
    assert version_of(empty_db_url) == scripts.get_current_head()


def test_models_match_the_migrated_database(db_url: URL) -> None:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diffs == []


def test_schema_from_models_equals_schema_from_history(db_url: URL, empty_db_url: URL) -> None:
    """Two ways to build the schema, one result (enums, checks and comments included)."""
    engine = create_engine(empty_db_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TYPE job_status AS ENUM "
                "('queued','running','succeeded','failed','canceled','dead_letter')"
            )
        )
        conn.execute(text("CREATE TYPE job_backoff_policy AS ENUM ('none','fixed','exp')"))
        Base.metadata.create_all(conn)
    engine.dispose()
    # RLS, grants, policies and storage parameters exist only in the history (tests/security
    # checks the first three, tests/ledger/test_hot_heartbeats.py what the fillfactor does).
    from_models = without_history_only(schema_of(empty_db_url))
    from_history = without_history_only(schema_of(db_url))
    assert from_models == from_history, render_diff(from_history, from_models)
