"""A bulk operator retry over many dead letters: how long it takes, how long each batch (and so
each row lock) lasts, and how long a concurrent writer of those rows waits meanwhile.

    uv run python bench/ops_bulk.py [jobs] [batch_size] [filter]

`filter` is `fingerprint` (default: the group the dashboard's "Retry this group" sends) or
`code` (by error code). Runs in a throwaway cluster; prints one table.
"""

from __future__ import annotations

import random
import statistics
import sys
import threading
import time
import uuid

from alembic import command
from sqlalchemy import create_engine, text

from heimdex.ledger import operations as ops
from heimdex.ledger.repository import JobFilter
from heimdex.models import JobStatus
from heimdex_db.config import alembic_config
from heimdex_db.localpg import LocalPostgres


def main() -> None:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else ops.DEFAULT_BATCH_SIZE
    by = sys.argv[3] if len(sys.argv) > 3 else "fingerprint"
    with LocalPostgres.throwaway() as cluster:
        url = cluster.url()
        command.upgrade(alembic_config(database_url=url), "head")
        engine = create_engine(url, pool_size=4)
        orgs = [uuid.uuid4() for _ in range(20)]
        with engine.begin() as conn:
            # Half the dead letters share one cause (the group retried), half another.
            conn.execute(
                text("""
INSERT INTO job (org_id, type, status, attempt, max_attempts, finished_at,
                 last_error_code, last_error_message)
SELECT (:orgs)[1 + i % cardinality(:orgs)], 'bench', 'dead_letter', 3, 3, now(),
       'UPSTREAM_TIMEOUT',
       CASE WHEN i % 2 = 0 THEN 'no answer from 10.0.0.' || i % 250 || ' after 30s'
            ELSE 'connection reset by peer (attempt ' || i % 7 || ')' END
  FROM generate_series(1, :n) AS i"""),
                {"orgs": orgs, "n": jobs},
            )
            conn.execute(text("ANALYZE job"))
            ids = [r[0] for r in conn.execute(text("SELECT id FROM job")).all()]
        with engine.connect() as conn:
            groups = ops.failures(conn)
        f = (
            JobFilter(statuses=(JobStatus.DEAD_LETTER,), error_fingerprint=groups[0].fingerprint)
            if by == "fingerprint"
            else JobFilter(statuses=(JobStatus.DEAD_LETTER,), error_code="UPSTREAM_TIMEOUT")
        )
        start = time.perf_counter()
        with engine.connect() as conn:
            count = ops.preview(conn, ops.Action.RETRY, f)
        preview_ms = (time.perf_counter() - start) * 1000

        waits: list[float] = []
        stop = threading.Event()

        def writer() -> None:
            # Another transaction touching random rows of the set, as a worker or API would.
            rng = random.Random(1)
            while not stop.is_set():
                t = time.perf_counter()
                with engine.begin() as conn:
                    conn.execute(
                        text("UPDATE job SET updated_at = now() WHERE id = :id"),
                        {"id": rng.choice(ids)},
                    )
                waits.append((time.perf_counter() - t) * 1000)
                time.sleep(0.005)

        batch_ms: list[float] = []
        last = [time.perf_counter()]

        def on_batch(_: int) -> None:
            now = time.perf_counter()
            batch_ms.append((now - last[0]) * 1000)
            last[0] = now

        thread = threading.Thread(target=writer)
        thread.start()
        start = last[0] = time.perf_counter()
        result = ops.bulk(
            engine, ops.Action.RETRY, f, ops.Operator("bench", "bench"),
            batch_size=batch, on_batch=on_batch,
        )  # fmt: skip
        total = time.perf_counter() - start
        stop.set()
        thread.join()
        engine.dispose()
    waits.sort()
    print(f"{jobs:,} dead letters, retry by {by} ({count:,} match), batch {batch}")
    rows = [
        ("dry-run count, ms", f"{preview_ms:,.0f}"),
        ("jobs retried", f"{result.jobs:,}"),
        ("batches", f"{result.batches:,}"),
        ("total, s", f"{total:,.1f}"),
        ("jobs/s", f"{result.jobs / total:,.0f}"),
        ("batch (transaction) median, ms", f"{statistics.median(batch_ms):,.0f}"),
        ("batch (transaction) longest, ms", f"{max(batch_ms):,.0f}"),
        ("concurrent writer p50, ms", f"{waits[len(waits) // 2]:,.1f}"),
        ("concurrent writer max, ms", f"{waits[-1]:,.1f}"),
        ("concurrent writes", f"{len(waits):,}"),
    ]
    for name, value in rows:
        print(f"  {name:<34} {value:>10}")


if __name__ == "__main__":
    main()
