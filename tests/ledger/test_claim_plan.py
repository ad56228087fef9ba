"""EXPLAIN guards: the claim and the placing step read the queue through its partial indexes and
`job` by primary key, never `job` as a whole: at 1M jobs, however long the finished history
grows, and on a small ledger in the plan a worker's prepared claim settles on (the generic
plan). A large queue is claimed without compiling the statement (JIT) on every run. The org
probe of every placing is one index scan, whatever the statistics say."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from heimdex.ledger import repository
from heimdex.ledger.repository.rows import driver_rows
from heimdex.ledger.repository.worker import PLACE_SQL, claim_sql

CLAIM_INDEX = "idx_job__claim_queue"
ORG_TURN_INDEX = "idx_job__org_queue_turn"
UNPLACED_INDEX = "idx_job__due"


def _plan_nodes(plan: dict[str, object]) -> list[dict[str, object]]:
    nodes = [plan]
    for child in plan.get("Plans", []):  # type: ignore[attr-defined]
        nodes.extend(_plan_nodes(child))
    return nodes


def _scans_of(engine: Engine, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan's nodes, each scan of `job` without a sequential one among them."""
    with engine.begin() as conn:
        ((plan,),) = driver_rows(conn, f"EXPLAIN (FORMAT JSON) {sql}", params)
        conn.rollback()
    nodes = _plan_nodes(json.loads(plan)[0]["Plan"] if isinstance(plan, str) else plan[0]["Plan"])
    scans = [n for n in nodes if "Scan" in str(n["Node Type"]) and n.get("Relation Name") == "job"]
    assert scans, nodes
    assert all(n["Node Type"] != "Seq Scan" for n in scans), [n["Node Type"] for n in scans]
    # A bitmap only for the lists of ids a statement updates (a batch, by primary key), never
    # over a queue index.
    bitmaps = {n.get("Index Name") for n in nodes if n["Node Type"] == "Bitmap Index Scan"}
    assert bitmaps <= {"pk_job"}, bitmaps
    return scans


@pytest.mark.slow
def test_claim_and_placing_are_index_scans_at_a_million_jobs(engine: Engine) -> None:
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
INSERT INTO job (org_id, type, priority, turn)
SELECT CAST(:org AS uuid), 'noop', g % 3, g FROM generate_series(1, 10000) AS g"""),
            {"org": orgs[0]},
        )
        # And 1,000 retries of the other orgs that came due unplaced: the placing step's.
        conn.execute(
            text("""
INSERT INTO job (org_id, type, attempt, run_at)
SELECT (CAST(:orgs AS uuid[]))[2 + g % 19], 'noop', 1, now() - make_interval(secs => g)
  FROM generate_series(1, 1000) AS g"""),
            {"orgs": orgs},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE job"))
    # The next jobs come off the index in claim order, and whether unplaced ones are due off
    # theirs, oldest first: a few rows, never the whole queue (a bitmap scan would, then sort).
    scans = _scans_of(engine, claim_sql(10), {"worker": "plan", "lease": 30, "q0": "default"})
    for index in (CLAIM_INDEX, UNPLACED_INDEX):
        assert any(
            n["Node Type"] in {"Index Scan", "Index Only Scan"} and n.get("Index Name") == index
            for n in scans
        ), scans
    assert {n.get("Index Name") for n in scans} <= {CLAIM_INDEX, UNPLACED_INDEX, "pk_job"}, scans
    # The placing step reads the due unplaced jobs oldest first off their index and updates
    # them by primary key (the org probes run in `job_last_turn`, guarded below).
    scans = _scans_of(engine, PLACE_SQL, {})
    assert any(
        n["Node Type"] == "Index Scan" and n.get("Index Name") == UNPLACED_INDEX for n in scans
    ), scans
    # the held jobs of the scopes with room: their own partial indexes
    held = {"idx_job__held_org", "idx_job__held_queue"}
    assert {n.get("Index Name") for n in scans} <= {UNPLACED_INDEX, "pk_job", *held}, scans


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
    numbered = {"worker": "$1", "lease": "$2", "q0": "$3"}
    sql = re.sub(r"%\((\w+)\)s", lambda m: numbered[m.group(1)], claim_sql(10))
    with engine.begin() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        driver.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        driver.execute(f"PREPARE claim_plan (text, float8, text) AS {sql}")
        ((plan,),) = driver.execute(
            "EXPLAIN (FORMAT JSON) EXECUTE claim_plan ('plan', 30, 'default')"
        ).fetchall()
        conn.rollback()
    nodes = _plan_nodes(plan[0]["Plan"])
    on_job = [n for n in nodes if n.get("Relation Name") == "job"]
    assert on_job, nodes
    assert all(n["Node Type"] != "Seq Scan" for n in on_job), [n["Node Type"] for n in on_job]


def _claim_plan(conn: Any) -> dict[str, Any]:
    cursor = conn.execute(
        f"EXPLAIN (ANALYZE, FORMAT JSON) {claim_sql(10)}",
        {"worker": "plan", "lease": 30, "q0": "default"},
    )
    plan: dict[str, Any] = cursor.fetchone()[0][0]
    return plan


@pytest.mark.slow
def test_a_large_queue_is_claimed_without_jit(engine: Engine, db_url: URL) -> None:
    """The claim's estimated cost once grew with the queue and passed `jit_above_cost` at about
    130k queued jobs; PostgreSQL then compiled it on every run (150k queued: 49 ms a claim,
    27 ms of it JIT). The fair queue's claim reads a bounded number of rows however long the
    queue, so its cost stays far below the threshold even in a plain session; connections from
    `make_engine` run with JIT off all the same (none of our statements is what JIT is for)."""
    orgs = [uuid.uuid4() for _ in range(10)]
    with engine.begin() as conn:
        # 150k queued jobs as submits place them, and 1,000 due ones waiting to be placed.
        conn.execute(
            text("""
INSERT INTO job (org_id, type, turn)
SELECT (CAST(:orgs AS uuid[]))[1 + g % 10], 'noop', g / 10 FROM generate_series(1, 150000) AS g"""),
            {"orgs": orgs},
        )
        conn.execute(
            text("""
INSERT INTO job (org_id, type, attempt)
SELECT (CAST(:orgs AS uuid[]))[1 + g % 10], 'noop', 1 FROM generate_series(1, 1000) AS g"""),
            {"orgs": orgs},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE job"))
    with engine.begin() as conn:
        driver = conn.connection.driver_connection
        assert driver.execute("SHOW jit").fetchone() == ("off",)
        plan = _claim_plan(driver)
        conn.rollback()
    assert "JIT" not in plan, plan.get("JIT")
    assert len(plan["Plan"].get("Plans", [])) > 0
    plain = db_url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain) as conn:
        threshold = float(conn.execute("SHOW jit_above_cost").fetchone()[0])
        plan = _claim_plan(conn)
        conn.rollback()
    assert "JIT" not in plan, plan.get("JIT")
    assert plan["Plan"]["Total Cost"] < threshold / 10, plan["Plan"]["Total Cost"]


@contextmanager
def _explained(engine: Engine) -> Iterator[tuple[psycopg.Connection[Any], list[str]]]:
    """A driver connection whose statements, nested ones included (the probe functions'), log
    their plans (auto_explain, with ANALYZE) into the list; what they changed is rolled back."""
    plans: list[str] = []
    with engine.connect() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        driver.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
        for setting in (
            "LOAD 'auto_explain'",
            "SET auto_explain.log_min_duration = 0",
            "SET auto_explain.log_nested_statements = on",
            "SET auto_explain.log_analyze = on",
            "SET client_min_messages = log",
        ):
            driver.execute(setting)
        try:
            yield driver, plans
        finally:
            conn.rollback()


def _probe_plans(engine: Engine, orgs: list[uuid.UUID]) -> tuple[list[int | None], list[str]]:
    """Each org's last turn at priority 0, probed 7 times (past PL/pgSQL's five custom plans,
    onto its generic one), and the probes' plans (auto_explain)."""
    with _explained(engine) as (driver, plans):
        lasts = [
            driver.execute(
                "SELECT heimdex_private.job_last_turn(%s, 'default', 0, 0)", (org,)
            ).fetchone()[0]  # type: ignore[index]
            for org in orgs
            for _ in range(7)
        ]
    probes = [p for p in plans if "FROM public.job" in p]
    assert len(probes) == 7 * len(orgs), plans
    return lasts, probes


def _assert_one_index_scan(probes: list[str]) -> None:
    for plan in probes:
        assert f"Index Only Scan Backward using {ORG_TURN_INDEX}" in plan, plan
        assert "Bitmap" not in plan and "Seq Scan" not in plan, plan
        assert re.search(r"Heap Fetches: [0-9]\b", plan) or "Heap Fetches" not in plan, plan


@pytest.mark.slow
def test_the_org_probe_is_one_index_scan_for_a_big_org_and_a_new_one(engine: Engine) -> None:
    """Placing a job reads its org's last turn (`heimdex_private.job_last_turn`). Planned with
    the org unknown, that probe was at times a bitmap scan, or a walk down the claim index:
    for an org with a big backlog, a read of every placed job of the org on each submit."""
    big, other = uuid.uuid4(), uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(
            text("""
INSERT INTO job (org_id, type, turn)
SELECT CASE WHEN g % 100 = 0 THEN CAST(:other AS uuid) ELSE CAST(:big AS uuid) END, 'noop', g
  FROM generate_series(1, 50000) AS g"""),
            {"big": big, "other": other},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE job"))
    lasts, probes = _probe_plans(engine, [big, other, uuid.uuid4()])
    assert lasts[0] == 49999 and lasts[7] == 50000 and lasts[14] is None, lasts
    _assert_one_index_scan(probes)


@pytest.mark.slow  # a large backlog, analyzed
def test_the_org_probe_keeps_its_index_when_the_statistics_predate_the_turns(
    engine: Engine,
) -> None:
    """A backlog that came due unplaced, analyzed before it was placed: the statistics say no
    job is placed. The probe then walked `idx_job__claim_order` backwards, filtered by org,
    through every placed job at that priority (52 ms a probe with 100,000 jobs placed over
    10,000 orgs), until the next ANALYZE."""
    orgs = [uuid.uuid4() for _ in range(1000)]
    with engine.begin() as conn:
        # No autovacuum: its ANALYZE would make the statistics current behind the test's back.
        conn.execute(text("ALTER TABLE job SET (autovacuum_enabled = off)"))
        conn.execute(
            text("""
INSERT INTO job (org_id, type, attempt, run_at)
SELECT (CAST(:orgs AS uuid[]))[1 + g % 1000], 'noop', 1, now() - make_interval(secs => g)
  FROM generate_series(1, 50000) AS g"""),
            {"orgs": orgs},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE job"))
        # Placed as the placing step places them: one org after the other, consecutive turns.
        conn.execute(
            text("""
UPDATE job AS j SET turn = n.turn
  FROM (SELECT id, row_number() OVER (PARTITION BY org_id ORDER BY run_at DESC) AS turn
          FROM job) AS n
 WHERE j.id = n.id""")
        )
    lasts, probes = _probe_plans(engine, orgs[:3])
    assert lasts == [50] * 21, lasts
    _assert_one_index_scan(probes)


def test_the_queue_clock_is_one_index_scan(engine: Engine) -> None:
    """Placing a job also reads where its queue stands (`heimdex_private.job_queue_clock`):
    the first entry of the claim index for that queue and priority, never a sort of the
    queue's backlog."""
    orgs = [uuid.uuid4() for _ in range(100)]
    with engine.begin() as conn:
        conn.execute(
            text("""
INSERT INTO job (org_id, type, queue, turn)
SELECT (CAST(:orgs AS uuid[]))[1 + g % 100], 'noop',
       CASE WHEN g % 10 = 0 THEN 'gpu' ELSE 'default' END, 1000 + g
  FROM generate_series(1, 50000) AS g"""),
            {"orgs": orgs},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE job"))
    with _explained(engine) as (driver, plans):
        clocks = [
            driver.execute(
                "SELECT heimdex_private.job_queue_clock(%s, 0, 10000000)", (queue,)
            ).fetchone()[0]  # type: ignore[index]
            for queue in ("gpu", "default", "idle")
            for _ in range(7)
        ]
    assert clocks == [1010] * 7 + [1001] * 7 + [10_000_000] * 7, clocks
    probes = [p for p in plans if "FROM public.job" in p]
    assert len(probes) == 21, plans
    for plan in probes:
        assert "Index Only Scan using idx_job__claim_queue" in plan, plan
        assert "Sort" not in plan and "Seq Scan" not in plan, plan


def test_the_claims_question_about_capped_scopes_reads_only_those_with_room(
    engine: Engine,
) -> None:
    """Every claim asks whether a capped scope has room again for the jobs held for it
    (`heimdex_private.job_limit_room()`). With thousands of orgs holding a cap or a weight, a
    sequential scan of `job_limit` was most of the claim: the planner does not know that the
    scopes whose jobs wait are mostly full ones."""
    with engine.begin() as conn:
        conn.execute(
            text("""
INSERT INTO job_limit (org_id, max_running, weight, used, waiting)
SELECT gen_random_uuid(), CASE WHEN g % 2 = 0 THEN 8 END, 1 + g % 3,
       CASE WHEN g % 2 = 0 THEN 8 - (g % 3) % 2 ELSE 0 END, g % 4 = 0
  FROM generate_series(1, 4000) AS g""")
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE job_limit"))
    assert "job_limit_room()" in repository.worker.claim_sql(10)
    with _explained(engine) as (driver, plans):
        answers = [
            driver.execute("SELECT heimdex_private.job_limit_room()").fetchone()[0]  # type: ignore[index]
            for _ in range(7)
        ]
        # One scope with a quarter of its cap free again: the answer turns.
        driver.execute(
            "UPDATE job_limit SET used = 6"
            " WHERE id = (SELECT min(id) FROM job_limit WHERE waiting AND max_running = 8)"
        )
        answers.append(driver.execute("SELECT heimdex_private.job_limit_room()").fetchone()[0])  # type: ignore[index]
    assert answers == [False] * 7 + [True], answers
    probes = [p for p in plans if "FROM public.job_limit" in p]
    assert len(probes) == 8, plans
    for plan in probes:
        assert "idx_job_limit__room" in plan, plan
        assert "Seq Scan" not in plan, plan


@pytest.mark.slow
def test_a_workers_claim_is_planned_once_not_on_every_run(engine: Engine) -> None:
    """With the batch size as a parameter, PostgreSQL's plan cache never trusted the claim's
    generic plan (estimated for an unknown limit) and planned the statement on every claim:
    0.5 ms each, a quarter of PostgreSQL's CPU per job in a 200k drain."""
    org = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO job (org_id, type, turn)"
                " SELECT :o, 'noop', g FROM generate_series(1, 50000) AS g"
            ),
            {"o": org},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE job"))
    with engine.connect() as conn:
        for _ in range(12):
            assert len(repository.claim(conn, worker_id="w", limit=10, lease_seconds=30).jobs) == 10
            conn.commit()
        driver = conn.connection.driver_connection
        assert driver is not None
        ((generic, custom),) = driver.execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE '%%job_turn_clock%%'"
        ).fetchall()
    assert custom <= 5 and generic >= 7, (generic, custom)
