"""Fixtures of the pooler tests: a pgbouncer per test, and the stack's processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy.engine import URL

from heimdex_db.localpooler import Pgbouncer
from tests.stack import processes, stack_env

__all__ = ["processes", "stack_env"]

PgbouncerFactory = Callable[..., Pgbouncer]


@pytest.fixture
def pgbouncer(pg_admin_url: URL) -> Iterator[PgbouncerFactory]:
    """Starts pgbouncers in front of the test cluster (`pool_mode`, limits as keywords);
    every one is stopped by its PID at the test's end."""
    started: list[Pgbouncer] = []

    def start(**options: object) -> Pgbouncer:
        bouncer = Pgbouncer(pg_admin_url, **options)  # type: ignore[arg-type]
        started.append(bouncer)
        return bouncer.start()

    yield start
    for bouncer in started:
        bouncer.stop()
