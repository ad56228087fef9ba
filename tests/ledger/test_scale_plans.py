"""EXPLAIN guards at 1M jobs: the API's list by status and retention's batch read through
their indexes (d5f1a9c3e7b2), never `job` as a whole, however long the history grows."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import TextualSelect

from heimdex.db import make_engine
from heimdex.ledger import repository, retention
from heimdex.models import JobStatus
from tests.conftest import DatabaseFactory

LIST_INDEX = "idx_job__org_id_status_created_at_id"
STATUS_INDEX = "idx_job__status_created_at"
RETENTION_INDEX = "idx_job__status_finished_at_id"
ORGS = [uuid.UUID(int=i + 1) for i in range(20)]
QUIET = uuid.UUID(int=999)  # an org with a few succeeded jobs and nothing else


# `big` (a minute on a loaded machine) once for the module's tests: the group would keep them
# on one worker (pytest-xdist 3.8 ignores it on pytest 9: each worker then builds its own).
pytestmark = [pytest.mark.xdist_group("scale_plans"), pytest.mark.slow]  # a 1M-job ledger


@pytest.fixture(scope="module")
def big(create_database: DatabaseFactory, head_template: str) -> Iterator[Engine]:
    """1M jobs over 20 orgs and 30 days, mostly finished, with 5 events each for 10% of them."""
    engine = make_engine(create_database(template=head_template))
    with engine.begin() as conn:
        conn.execute(
            text("""
INSERT INTO job (org_id, type, status, created_at, updated_at, run_at, finished_at)
SELECT (CAST(:orgs AS uuid[]))[1 + g % 20], 'noop', s.status, t, t, t,
       CASE WHEN s.status IN ('queued', 'running') THEN NULL ELSE t + interval '1 second' END
  FROM generate_series(1, 1000000) AS g
 CROSS JOIN LATERAL (SELECT now() - make_interval(secs => g * 2.592) AS t) AS ts
 CROSS JOIN LATERAL (SELECT CAST(CASE WHEN g % 100 = 0 THEN 'failed'
                                      WHEN g % 100 = 1 THEN 'dead_letter'
                                      WHEN g % 100 = 2 THEN 'canceled'
                                      WHEN g % 1000 = 3 THEN 'queued'
                                      ELSE 'succeeded' END AS job_status) AS status) AS s"""),
            {"orgs": ORGS},
        )
        conn.execute(
            text("""
INSERT INTO job (org_id, type, status, finished_at)
SELECT :org, 'noop', 'succeeded', now() FROM generate_series(1, 10)"""),
            {"org": QUIET},
        )
        conn.execute(
            text("""
INSERT INTO job_event (job_id, ts, prev_status, next_status)
SELECT j.id, j.created_at, 'queued', 'running'
  FROM job AS j CROSS JOIN generate_series(1, 5)
 WHERE j.created_at > now() - interval '3 days'""")
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE job, job_event"))
    yield engine
    engine.dispose()


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(_nodes(child))
    return nodes


def _plan(
    engine: Engine, query: TextClause | TextualSelect, params: dict[str, Any]
) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        raw = conn.execute(
            text(f"EXPLAIN (FORMAT JSON) {query.compile(compile_kwargs={})}"), params
        ).scalar_one()
        conn.rollback()
    doc = json.loads(raw) if isinstance(raw, str) else raw
    return _nodes(doc[0]["Plan"])


def _job_scans(nodes: list[dict[str, Any]], relation: str = "job") -> list[dict[str, Any]]:
    return [n for n in nodes if "Scan" in n["Node Type"] and n.get("Relation Name") == relation]


@pytest.mark.parametrize(
    ("org", "status", "cursor"),
    [
        (ORGS[0], JobStatus.FAILED, False),  # 1% of the org's history
        (ORGS[0], JobStatus.FAILED, True),  # the next page
        (ORGS[1], JobStatus.RUNNING, False),  # none: one probe, not a walk over the history
        (QUIET, JobStatus.DEAD_LETTER, False),
    ],
)
def test_the_list_by_status_reads_its_index_in_order(
    big: Engine, org: uuid.UUID, status: JobStatus, cursor: bool
) -> None:
    before = (datetime.now(UTC) - timedelta(days=10), uuid.UUID(int=0)) if cursor else None
    query, params = repository.list_jobs_query(org_id=org, status=status, limit=50, before=before)
    nodes = _plan(big, query, params)
    scans = _job_scans(nodes)
    # A status the ledger holds almost none of (running) may come off the global status index
    # instead: one probe that finds nothing either way, which the planner picks by a coin flip
    # of its statistics. Every other case must take the list index.
    allowed = {LIST_INDEX} | ({STATUS_INDEX} if status is JobStatus.RUNNING else set())
    found = [(n["Node Type"], n.get("Index Name")) for n in scans]
    assert len(found) == 1 and found[0][0] == "Index Scan" and found[0][1] in allowed, found
    # Newest first straight off the list index: no sort of whatever the filter matched (off the
    # status index, the sort is of the nothing it found).
    if found[0][1] == LIST_INDEX:
        assert not any("Sort" in n["Node Type"] for n in nodes), [n["Node Type"] for n in nodes]


@pytest.mark.parametrize(
    ("status", "excluded", "org"),
    [
        (JobStatus.SUCCEEDED, (), None),  # 97% of the table is old enough
        (JobStatus.DEAD_LETTER, (), None),
        (JobStatus.SUCCEEDED, (ORGS[3], ORGS[4]), None),  # orgs with their own ages
        (JobStatus.SUCCEEDED, (), ORGS[3]),  # one of those orgs (5% of the rows)
    ],
)
def test_a_retention_batch_reads_its_index_in_order(
    big: Engine, status: JobStatus, excluded: tuple[uuid.UUID, ...], org: uuid.UUID | None
) -> None:
    target = retention.Target(status, timedelta(days=1), org, excluded)
    query = text(retention._victims(target, retention.DEFAULT_BATCH_SIZE))
    params = {
        **target.params(datetime.now(UTC)),
        "after_ts": datetime.now(UTC) - timedelta(days=20),
        "after_id": uuid.UUID(int=0),
    }
    nodes = _plan(big, query, params)
    scans = _job_scans(nodes)
    assert [(n["Node Type"], n.get("Index Name")) for n in scans] == [
        ("Index Scan", RETENTION_INDEX)
    ], scans
    assert not any("Sort" in n["Node Type"] for n in nodes), [n["Node Type"] for n in nodes]


def test_a_retention_batch_deletes_events_through_the_job_id_index(big: Engine) -> None:
    with big.connect() as conn:
        ids = list(
            conn.execute(
                text("SELECT id FROM job WHERE created_at > now() - interval '1 day' LIMIT 500")
            ).scalars()
        )
    for statement in (retention._DELETE_EVENTS, retention._EVENTS):
        scans = _job_scans(_plan(big, statement, {"ids": ids}), "job_event")
        assert scans, statement
        assert all(n["Node Type"] in ("Index Scan", "Bitmap Heap Scan") for n in scans), scans
        assert "Seq Scan" not in {n["Node Type"] for n in scans}
