"""EXPLAIN guards: the claim reads the queue through its partial index and `job` by primary key,
never `job` as a whole: at 1M jobs, however long the finished history grows, and on a small
ledger in the plan a worker's prepared claim settles on (the generic plan). And a large queue
is claimed without compiling the statement (JIT) on every run."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from heimdex_common.ledger import repository

CLAIM_INDEX = "idx_job__queued_claim"


def _plan_nodes(plan: dict[str, object]) -> list[dict[str, object]]:
    nodes = [plan]
    for child in plan.get("Plans", []):  # type: ignore[attr-defined]
        nodes.extend(_plan_nodes(child))
    return nodes


def test_claim_is_an_index_scan_at_a_million_jobs(engine: Engine) -> None:
    orgs = [uuid.uuid4() for _ in range(20)]
    with engine.begin() as conn:
        # 990k finished jobs spread over 20 orgs, and a queue of 10k (one org's bulk ingest).
        conn.execute(
            text("""
INSERT INTO job (org_id, type, status, finished_at, created_at, run_at)
SELECT (CAST(:orgs AS uuid[]))[1 + g % 20], 'noop', 'succeeded', now(),
       now() - make_interval(secs => g), now() - make_interval(secs => g)
  FROM generate_series(1, 990000) AS g"""),
            {"orgs": orgs},
        )
        conn.execute(
            text("""
INSERT INTO job (org_id, type, priority)
SELECT CAST(:org AS uuid), 'noop', g % 3 FROM generate_series(1, 10000) AS g"""),
            {"org": orgs[0]},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE job"))
    with engine.begin() as conn:
        ((plan,),) = repository._driver_rows(
            conn,
            f"EXPLAIN (FORMAT JSON) {repository._CLAIM}",
            {"limit": 10, "worker": "plan", "lease": 30},
        )
        conn.rollback()
    nodes = _plan_nodes(json.loads(plan)[0]["Plan"] if isinstance(plan, str) else plan[0]["Plan"])
    scans = [n for n in nodes if "Scan" in str(n["Node Type"]) and n.get("Relation Name") == "job"]
    assert scans, nodes
    assert all(n["Node Type"] != "Seq Scan" for n in scans), [n["Node Type"] for n in scans]
    # Each org's next jobs come off the index in claim order: read a few rows, never the
    # org's whole backlog (a bitmap scan would, then sort it).
    assert any(
        n["Node Type"] == "Index Scan" and n.get("Index Name") == CLAIM_INDEX for n in scans
    ), scans
    assert not any(n["Node Type"] == "Bitmap Heap Scan" for n in scans), scans
    assert {n.get("Index Name") for n in scans if "Index" in str(n["Node Type"])} <= {
        CLAIM_INDEX,
        "pk_job",
    }, scans


def test_the_prepared_claims_generic_plan_reads_no_table_on_a_small_ledger(engine: Engine) -> None:
    """A worker runs the claim as a prepared statement: PostgreSQL may keep its generic plan,
    planned without the parameters' values. On a small ledger that plan once joined the picked
    ids to a sequential scan of `job`, every row on each claim (5,000 jobs: 2.5 ms a claim
    against 0.8 ms by primary key)."""
    orgs = [uuid.uuid4() for _ in range(10)]
    with engine.begin() as conn:
        conn.execute(
            text("""
INSERT INTO job (org_id, type, status, finished_at, run_at)
SELECT (CAST(:orgs AS uuid[]))[1 + g % 10], 'noop',
       CASE WHEN g <= 2000 THEN 'succeeded' ELSE 'queued' END::job_status,
       CASE WHEN g <= 2000 THEN now() END, now() - make_interval(secs => g)
  FROM generate_series(1, 5000) AS g"""),
            {"orgs": orgs},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE job"))
    numbered = {"limit": "$1", "worker": "$2", "lease": "$3"}
    sql = re.sub(r"%\((\w+)\)s", lambda m: numbered[m.group(1)], repository._CLAIM)
    with engine.begin() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        driver.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        driver.execute(f"PREPARE claim_plan (int, text, float8) AS {sql}")
        ((plan,),) = driver.execute(
            "EXPLAIN (FORMAT JSON) EXECUTE claim_plan (10, 'plan', 30)"
        ).fetchall()
        conn.rollback()
    nodes = _plan_nodes(plan[0]["Plan"])
    on_job = [n for n in nodes if n.get("Relation Name") == "job"]
    assert on_job, nodes
    assert all(n["Node Type"] != "Seq Scan" for n in on_job), [n["Node Type"] for n in on_job]


def _claim_plan(conn: Any) -> dict[str, Any]:
    cursor = conn.execute(
        f"EXPLAIN (ANALYZE, FORMAT JSON) {repository._CLAIM}",
        {"limit": 10, "worker": "plan", "lease": 30},
    )
    plan: dict[str, Any] = cursor.fetchone()[0][0]
    return plan


def test_a_large_queue_is_claimed_without_jit(engine: Engine, db_url: URL) -> None:
    """The claim's estimated cost grows with the queue and passes `jit_above_cost` at about
    130k queued jobs; PostgreSQL then compiled it on every run (150k queued: 49 ms a claim,
    27 ms of it JIT). Connections from `make_engine` run with JIT off."""
    orgs = [uuid.uuid4() for _ in range(10)]
    with engine.begin() as conn:
        conn.execute(
            text("""
INSERT INTO job (org_id, type)
SELECT (CAST(:orgs AS uuid[]))[1 + g % 10], 'noop' FROM generate_series(1, 150000) AS g"""),
            {"orgs": orgs},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE job"))
    with engine.begin() as conn:
        driver = conn.connection.driver_connection
        plan = _claim_plan(driver)
        conn.rollback()
    assert "JIT" not in plan, plan.get("JIT")
    assert len(plan["Plan"].get("Plans", [])) > 0
    # The queue is large enough for the guard to matter: a plain session (the server's default
    # JIT settings) compiles the same statement, where the server can JIT at all.
    plain = db_url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain) as conn:
        if conn.execute("SELECT pg_jit_available()").fetchone() == (True,):
            assert "JIT" in _claim_plan(conn)
        conn.rollback()
