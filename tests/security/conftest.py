"""Two databases with the same history: one migrated by Alembic, one built from offline SQL alone.

Both are built by a non-superuser owner (`heimdex_owner`), as the compose stack's user or
Supabase's `postgres` would be: a superuser bypasses RLS, so it would prove nothing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from alembic import command
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from heimdex_db.config import alembic_config
from heimdex_db.supabase.artifacts import compile_artifacts
from tests.conftest import WORKER
from tests.inprocess import alembic

COMMON = Path(__file__).resolve().parents[2] / "packages" / "common"
OWNER = "heimdex_owner"
BUILDS = ("migrated", "artifacts")
DatabaseFactory = Callable[..., URL]


def offline_sql(start: str | None, end: str) -> str:
    """`alembic upgrade [start:]end --sql` run in packages/common with no database reachable
    (in this process: tests/inprocess.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    env.update(PGHOST="nowhere.invalid", PGPORT="1")
    span = f"{start}:{end}" if start else end
    proc = alembic("upgrade", span, "--sql", cwd=COMMON, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def artifacts() -> list[tuple[str, str]]:
    """(revision, SQL) for every Supabase artifact in order, as `heimdex db sql` compiles them
    (a revision's CREATE INDEX CONCURRENTLY gets a file of its own)."""
    return [(a.revision, a.content) for a in compile_artifacts(alembic_config())]


def apply_sql_file(url: URL, sql: str) -> None:
    """Apply one artifact in one transaction, as `psql -1 -f` or the Supabase CLI would.

    Alembic's offline output brackets each revision in BEGIN/COMMIT; those lines are dropped so
    the whole file (its version-table prelude included) commits or fails as one: several
    statements sent as one query are one implicit transaction. A file holding one statement of
    an autocommit block (CREATE INDEX CONCURRENTLY) runs on its own, outside any transaction.
    """
    body = "\n".join(
        line for line in sql.splitlines() if line.strip().upper() not in ("BEGIN;", "COMMIT;")
    )
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database, autocommit=True
    ) as conn:
        conn.execute(body.encode())  # bytes: no client-side placeholder parsing


@pytest.fixture(scope="session")
def owner_role(admin_engine: Engine) -> str:
    with admin_engine.connect() as conn:
        # CREATEROLE: the history creates anon/authenticated/service_role when missing. Roles
        # belong to the server: on a shared one (HEIMDEX_TEST_PG_URL) another xdist worker may
        # create it between a look and a CREATE, hence the exception handler.
        conn.execute(
            text(
                f"DO $$ BEGIN CREATE ROLE {OWNER} LOGIN NOSUPERUSER CREATEROLE;"
                " EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
            )
        )
    return OWNER


def _owned_database(create_database: DatabaseFactory, admin_engine: Engine, name: str) -> URL:
    url = create_database(name=name)
    with admin_engine.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" OWNER TO {OWNER}'))
    return url.set(username=OWNER)


@pytest.fixture(scope="session")
def templates(
    create_database: DatabaseFactory, admin_engine: Engine, owner_role: str
) -> dict[str, str]:
    names = {build: f"heimdex_template_rls_{build}_{WORKER}" for build in BUILDS}
    migrated = _owned_database(create_database, admin_engine, names["migrated"])
    command.upgrade(alembic_config(database_url=migrated), "head")
    built = _owned_database(create_database, admin_engine, names["artifacts"])
    for _, sql in artifacts():
        apply_sql_file(built, sql)
    return names


@dataclass(frozen=True)
class Ledger:
    """A database at head seeded with two orgs' jobs and events, and its owner's engine."""

    build: str
    url: URL
    admin_url: URL
    owner: Engine
    org_a: uuid.UUID
    org_b: uuid.UUID
    jobs: dict[uuid.UUID, list[uuid.UUID]]
    events: dict[uuid.UUID, list[uuid.UUID]]


def _seed(owner: Engine, org: uuid.UUID, n: int) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    jobs, events = [], []
    with owner.begin() as conn:
        for i in range(n):
            job = conn.execute(
                text("INSERT INTO job (org_id, type) VALUES (:o, :t) RETURNING id"),
                {"o": org, "t": f"seed_{i}"},
            ).scalar_one()
            jobs.append(job)
            for prev, nxt in ((None, "queued"), ("queued", "running")):
                events.append(
                    conn.execute(
                        text(
                            "INSERT INTO job_event (job_id, prev_status, next_status)"
                            " VALUES (:j, :p, :n) RETURNING id"
                        ),
                        {"j": job, "p": prev, "n": nxt},
                    ).scalar_one()
                )
    return jobs, events


@pytest.fixture(params=BUILDS)
def ledger_db(
    request: pytest.FixtureRequest,
    create_database: DatabaseFactory,
    templates: dict[str, str],
) -> Iterator[Ledger]:
    build: str = request.param
    admin_url = create_database(template=templates[build])
    url = admin_url.set(username=OWNER)
    owner = create_engine(url)
    org_a, org_b = uuid.uuid4(), uuid.uuid4()
    jobs_a, events_a = _seed(owner, org_a, 3)
    jobs_b, events_b = _seed(owner, org_b, 2)
    yield Ledger(
        build=build,
        url=url,
        admin_url=admin_url,
        owner=owner,
        org_a=org_a,
        org_b=org_b,
        jobs={org_a: jobs_a, org_b: jobs_b},
        events={org_a: events_a, org_b: events_b},
    )
    owner.dispose()
