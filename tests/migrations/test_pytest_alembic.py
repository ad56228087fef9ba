"""pytest-alembic's built-in tests, unchanged, against our history on a real database:
one head, upgrade base -> head, models match the DDL, up/down consistency."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pytest_alembic.tests import (
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)
from sqlalchemy import Engine, create_engine, pool

from heimdex_db.config import alembic_config as heimdex_alembic_config
from tests.conftest import DatabaseFactory

__all__ = [
    "test_model_definitions_match_ddl",
    "test_single_head_revision",
    "test_up_down_consistency",
    "test_upgrade",
]

pytestmark = pytest.mark.slow  # the whole history walked, up and down


@pytest.fixture
def alembic_config():  # type: ignore[no-untyped-def]
    return heimdex_alembic_config()


@pytest.fixture
def alembic_engine(create_database: DatabaseFactory) -> Iterator[Engine]:
    engine = create_engine(
        create_database().set(drivername="postgresql+psycopg"), poolclass=pool.NullPool
    )
    yield engine
    engine.dispose()
