"""Cost of the RLS policies: the same queries as the table owner and as `authenticated`.

    uv run python bench/rls_overhead.py [jobs] [orgs]

Runs in a throwaway cluster; prints median milliseconds over repeated runs.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid

from alembic import command
from sqlalchemy import Connection, create_engine, text

from heimdex_db.config import alembic_config
from heimdex_db.localpg import LocalPostgres

# {where} is the owner's explicit org filter (what the API writes); RLS adds it by itself.
QUERIES = {
    "count(*) job": "SELECT count(*) FROM job {where}",
    "latest 20 jobs": "SELECT id FROM job {where} ORDER BY created_at DESC LIMIT 20",
    "events of latest 20": (
        "SELECT count(*) FROM job_event e JOIN"
        " (SELECT id FROM job {where} ORDER BY created_at DESC LIMIT 20) j ON j.id = e.job_id"
    ),
}
REPEAT = 15


def _median_ms(conn: Connection, sql: str) -> float:
    times = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        conn.execute(text(sql)).all()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    orgs = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    with LocalPostgres.throwaway() as cluster:
        url = cluster.url()
        command.upgrade(alembic_config(database_url=url), "head")
        engine = create_engine(url)
        org_ids = [uuid.uuid4() for _ in range(orgs)]
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO job (org_id, type)"
                    " SELECT (:orgs)[1 + i % cardinality(:orgs)], 'bench'"
                    " FROM generate_series(1, :n) AS i"
                ),
                {"orgs": org_ids, "n": jobs},
            )
            conn.execute(
                text("INSERT INTO job_event (job_id, next_status) SELECT id, 'queued' FROM job")
            )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE job"))
            conn.execute(text("VACUUM ANALYZE job_event"))
            print(f"{jobs} jobs, {orgs} orgs ({jobs // orgs} per org), median of {REPEAT} runs")
            print(f"{'query':<22} {'owner, WHERE org_id ms':>24} {'authenticated, RLS ms':>22}")
            for name, sql in QUERIES.items():
                owner = _median_ms(conn, sql.format(where=f"WHERE org_id = '{org_ids[0]}'"))
                conn.execute(text("SET ROLE authenticated"))
                conn.execute(
                    text("SELECT set_config('request.jwt.claims', :c, false)"),
                    {"c": json.dumps({"org_id": str(org_ids[0])})},
                )
                tenant = _median_ms(conn, sql.format(where=""))
                conn.execute(text("RESET ROLE"))
                print(f"{name:<22} {owner:>24.2f} {tenant:>22.2f}")
        engine.dispose()


if __name__ == "__main__":
    main()
