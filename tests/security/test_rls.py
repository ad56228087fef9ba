"""Tenant isolation per table and role, on a migrated database and on one built from artifacts."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from heimdex.ledger import repository, service
from heimdex.ledger.registry import load_registry
from heimdex_db.verify.schema import render_diff, snapshot
from tests.security.conftest import Ledger

INSUFFICIENT_PRIVILEGE = "42501"


def claims(org: uuid.UUID | str) -> str:
    return json.dumps({"sub": str(uuid.uuid4()), "role": "authenticated", "org_id": str(org)})


@contextmanager
def acting_as(db: Ledger, role: str, jwt_claims: str | None = None) -> Iterator[Connection]:
    """A transaction as `role` with `jwt_claims` set the way PostgREST sets them; rolled back."""
    engine = create_engine(db.admin_url)
    try:
        with engine.connect() as conn:
            conn.execute(text(f"SET LOCAL ROLE {role}"))
            if jwt_claims is not None:
                conn.execute(
                    text("SELECT set_config('request.jwt.claims', :c, true)"), {"c": jwt_claims}
                )
            try:
                yield conn
            finally:
                conn.rollback()
    finally:
        engine.dispose()


def refused(db: Ledger, role: str, jwt_claims: str | None, sql: str, **params: object) -> str:
    """The SQLSTATE with which `sql` fails for `role` (the test fails if it succeeds)."""
    with acting_as(db, role, jwt_claims) as conn, pytest.raises(DBAPIError) as exc:
        conn.execute(text(sql), params)
    return str(getattr(exc.value.orig, "sqlstate", ""))


def ids(conn: Connection, sql: str, **params: object) -> set[uuid.UUID]:
    return set(conn.execute(text(sql), params).scalars())


def owner_state(db: Ledger) -> list[tuple[object, ...]]:
    with db.owner.connect() as conn:
        jobs = conn.execute(text("SELECT * FROM job ORDER BY id")).all()
        events = conn.execute(text("SELECT * FROM job_event ORDER BY id")).all()
    return [tuple(r) for r in [*jobs, *events]]


def test_authenticated_sees_only_its_own_org(ledger_db: Ledger) -> None:
    db, a, b = ledger_db, ledger_db.org_a, ledger_db.org_b
    with acting_as(db, "authenticated", claims(a)) as conn:
        assert ids(conn, "SELECT id FROM job") == set(db.jobs[a])
        assert conn.execute(text("SELECT count(*) FROM job")).scalar() == len(db.jobs[a])
        assert ids(conn, "SELECT id FROM job_event") == set(db.events[a])
        assert conn.execute(text("SELECT count(*) FROM job_event")).scalar() == len(db.events[a])
        joined = ids(conn, "SELECT e.id FROM job_event e JOIN job j ON j.id = e.job_id")
        assert joined == set(db.events[a])
        # Asking for the other org by name or by id finds nothing.
        assert ids(conn, "SELECT id FROM job WHERE org_id = :b", b=b) == set()
        assert ids(conn, "SELECT id FROM job WHERE id = ANY(:j)", j=db.jobs[b]) == set()
        assert ids(conn, "SELECT id FROM job_event WHERE job_id = ANY(:j)", j=db.jobs[b]) == set()
    with acting_as(db, "authenticated", claims(b)) as conn:
        assert ids(conn, "SELECT id FROM job") == set(db.jobs[b])
        assert ids(conn, "SELECT id FROM job_event") == set(db.events[b])


def test_authenticated_creates_queued_jobs_of_its_own_org(ledger_db: Ledger) -> None:
    db, a = ledger_db, ledger_db.org_a
    with acting_as(db, "authenticated", claims(a)) as conn:
        row = conn.execute(
            text(
                "INSERT INTO job (org_id, type, idempotency_key) VALUES (:a, 'ingest', 'k1')"
                " RETURNING id, status, attempt, finished_at"
            ),
            {"a": a},
        ).one()
        assert (row.status, row.attempt, row.finished_at) == ("queued", 0, None)
        conn.commit()
    with db.owner.connect() as conn:
        assert (
            conn.execute(text("SELECT org_id FROM job WHERE id = :i"), {"i": row.id}).scalar() == a
        )


@pytest.mark.parametrize(
    "insert",
    [
        pytest.param("INSERT INTO job (org_id, type) VALUES (:b, 'ingest')", id="other-org"),
        pytest.param(
            "INSERT INTO job (org_id, type, status) VALUES (:a, 'ingest', 'running')",
            id="status",
        ),
        pytest.param(
            "INSERT INTO job (org_id, type, attempt) VALUES (:a, 'ingest', 3)", id="attempt"
        ),
        pytest.param(
            "INSERT INTO job (org_id, type, last_error_code) VALUES (:a, 'ingest', 'X')",
            id="errors",
        ),
        pytest.param(
            "INSERT INTO job (org_id, type, priority) VALUES (:a, 'ingest', 100)", id="priority"
        ),
        pytest.param(
            "INSERT INTO job_event (job_id, next_status) VALUES (:job_a, 'running')",
            id="job_event",
        ),
    ],
)
def test_authenticated_cannot_create_what_the_backend_owns(ledger_db: Ledger, insert: str) -> None:
    db, a = ledger_db, ledger_db.org_a
    before = owner_state(db)
    state = refused(db, "authenticated", claims(a), insert, a=a, b=db.org_b, job_a=db.jobs[a][0])
    assert state == INSUFFICIENT_PRIVILEGE
    assert owner_state(db) == before


@pytest.mark.parametrize(
    "change",
    [
        "UPDATE job SET status = 'succeeded', finished_at = now() WHERE id = :job_a",
        "UPDATE job SET attempt = attempt + 1 WHERE id = :job_a",
        "UPDATE job SET last_error_code = NULL, last_error_message = NULL WHERE id = :job_a",
        "UPDATE job SET requested_by = 'me' WHERE id = :job_a",
        "UPDATE job SET status = 'canceled', finished_at = now() WHERE id = :job_b",
        "DELETE FROM job WHERE id = :job_a",
        "DELETE FROM job",
        "UPDATE job_event SET next_status = 'succeeded' WHERE job_id = :job_a",
        "DELETE FROM job_event WHERE job_id = :job_a",
        "TRUNCATE job_event",
    ],
)
def test_authenticated_cannot_change_or_delete(ledger_db: Ledger, change: str) -> None:
    db, a = ledger_db, ledger_db.org_a
    before = owner_state(db)
    state = refused(
        db, "authenticated", claims(a), change, job_a=db.jobs[a][0], job_b=db.jobs[db.org_b][0]
    )
    assert state == INSUFFICIENT_PRIVILEGE
    assert owner_state(db) == before


@pytest.mark.parametrize(
    "query",
    [
        "SELECT count(*) FROM job",
        "SELECT count(*) FROM job_event",
        "INSERT INTO job (org_id, type) VALUES (:a, 'ingest')",
        "SELECT heimdex_private.current_org_id()",
        "SELECT version_num FROM heimdex_private.alembic_version",
    ],
)
@pytest.mark.parametrize("with_claims", [False, True], ids=["no-claims", "org-a-claims"])
def test_anon_gets_nothing(ledger_db: Ledger, query: str, with_claims: bool) -> None:
    db = ledger_db
    jwt = claims(db.org_a) if with_claims else None
    assert refused(db, "anon", jwt, query, a=db.org_a) == INSUFFICIENT_PRIVILEGE


def test_authenticated_cannot_reach_the_version_table(ledger_db: Ledger) -> None:
    db = ledger_db
    sql = "SELECT version_num FROM heimdex_private.alembic_version"
    assert refused(db, "authenticated", claims(db.org_a), sql) == INSUFFICIENT_PRIVILEGE


MALFORMED = [
    None,
    "",
    "not json",
    "{}",
    "[]",
    "42",
    '"org_id"',
    '{"org_id": null}',
    '{"org_id": ""}',
    '{"org_id": "not-a-uuid"}',
    '{"org_id": 42}',
    '{"org_id": {"id": "x"}}',
    '{"app_metadata": {"org_id": "00000000-0000-0000-0000-000000000000"}}',
]


@pytest.mark.parametrize("jwt", MALFORMED, ids=repr)
def test_missing_or_malformed_claims_see_nothing(ledger_db: Ledger, jwt: str | None) -> None:
    db = ledger_db
    with acting_as(db, "authenticated", jwt) as conn:
        assert conn.execute(text("SELECT heimdex_private.current_org_id()")).scalar() is None
        assert conn.execute(text("SELECT count(*) FROM job")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM job_event")).scalar() == 0
        assert ids(conn, "SELECT id FROM job WHERE id = ANY(:j)", j=db.jobs[db.org_a]) == set()
    insert = "INSERT INTO job (org_id, type) VALUES (:a, 'ingest')"
    assert refused(db, "authenticated", jwt, insert, a=db.org_a) == INSUFFICIENT_PRIVILEGE


def test_claims_set_for_one_transaction_do_not_leak_into_the_next(ledger_db: Ledger) -> None:
    db = ledger_db
    engine = create_engine(db.admin_url)
    with engine.connect() as conn:
        conn.execute(text("SET ROLE authenticated"))
        conn.execute(
            text("SELECT set_config('request.jwt.claims', :c, true)"), {"c": claims(db.org_a)}
        )
        assert conn.execute(text("SELECT count(*) FROM job")).scalar() == len(db.jobs[db.org_a])
        conn.commit()
        # Same session, next transaction: the setting is back to '' and nothing is visible.
        assert conn.execute(text("SELECT count(*) FROM job")).scalar() == 0
        conn.rollback()
    engine.dispose()


def test_backend_owner_sees_and_changes_everything(ledger_db: Ledger) -> None:
    db = ledger_db
    every_job = {j for jobs in db.jobs.values() for j in jobs}
    with db.owner.connect() as conn:
        assert ids(conn, "SELECT id FROM job") == every_job
        assert ids(conn, "SELECT id FROM job_event") == {e for ev in db.events.values() for e in ev}
    # The service and repository the API and workers use, unchanged, as the owner.
    with db.owner.begin() as conn:
        spec = service.JobSpec("noop", {})
        submitted = service.submit_job(conn, load_registry(), org_id=db.org_b, spec=spec)
        claimed = repository.claim(conn, worker_id="w", limit=100, lease_seconds=30).jobs
        assert submitted.job.id in {job.id for job in claimed}
        events = repository.list_events(conn, submitted.job.id)
        assert [e.next_status for e in events] == ["queued", "running"]
    with db.owner.begin() as conn:
        conn.execute(text("DELETE FROM job WHERE id = :j"), {"j": db.jobs[db.org_a][0]})
        assert conn.execute(text("SELECT count(*) FROM job")).scalar() == len(every_job)


def test_service_role_sees_and_changes_everything(ledger_db: Ledger) -> None:
    db = ledger_db
    every_job = {j for jobs in db.jobs.values() for j in jobs}
    with acting_as(db, "service_role") as conn:
        assert ids(conn, "SELECT id FROM job") == every_job
        assert conn.execute(text("SELECT count(*) FROM job_event")).scalar() == sum(
            len(e) for e in db.events.values()
        )
        job_b = db.jobs[db.org_b][0]
        conn.execute(
            text("UPDATE job SET status = 'running', attempt = 1 WHERE id = :j"), {"j": job_b}
        )
        conn.execute(
            text("INSERT INTO job_event (job_id, next_status) VALUES (:j, 'running')"),
            {"j": job_b},
        )
        conn.execute(text("DELETE FROM job WHERE id = :j"), {"j": db.jobs[db.org_a][0]})
        assert conn.execute(text("SELECT count(*) FROM job")).scalar() == len(every_job) - 1


def test_database_built_from_artifacts_equals_the_migrated_one(
    templates: dict[str, str], pg_admin_url: URL
) -> None:
    snaps = {}
    for build, name in templates.items():
        engine = create_engine(pg_admin_url.set(database=name))
        with engine.connect() as conn:
            snaps[build] = snapshot(conn)
            snaps[build]["version"] = {
                "heimdex_private.alembic_version": tuple(
                    conn.execute(text("SELECT version_num FROM heimdex_private.alembic_version"))
                    .scalars()
                    .all()
                )
            }
        engine.dispose()
    assert snaps["artifacts"] == snaps["migrated"], render_diff(
        snaps["migrated"], snaps["artifacts"]
    )
    assert snaps["migrated"]["policies"], "the migrated database has no policies at all"


def test_policies_read_the_claim_once_per_statement_and_keep_the_org_index(
    ledger_db: Ledger,
) -> None:
    db = ledger_db
    with acting_as(db, "authenticated", claims(db.org_a)) as conn:
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(
            conn.execute(
                text("EXPLAIN SELECT id FROM job ORDER BY created_at DESC LIMIT 20")
            ).scalars()
        )
    assert plan.count("InitPlan") == 1, plan
    assert "Index Cond: (org_id = $0)" in plan, plan
    assert "idx_job__org_id_created_at_desc" in plan, plan
