"""EXPLAIN guard: at 1M jobs the claim reads the queue through its partial index, never `job`
as a whole, however long the finished history grows."""

from __future__ import annotations

import json
import uuid

from sqlalchemy import Engine, text

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
