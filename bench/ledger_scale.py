"""The ledger at scale: p50/p99 of the API's reads, the claim and a retention pass, at N jobs.

    uv run python bench/ledger_scale.py --jobs 1000000,10000000
    uv run python bench/ledger_scale.py --jobs 1000000 --layout plain,partitioned

For each size (and each `job_event` layout) a throwaway PostgreSQL cluster (fsync on) is
migrated to head, then loaded in SQL (INSERT ... SELECT over generate_series, logged tables,
indexes in place): N jobs over `--orgs` orgs and `--days` days (1% failed, 1% dead_letter, 1%
canceled, 0.1% queued, the rest succeeded) with `--events-per-job` events each, then VACUUM
ANALYZE. Then, while a writer submits a job every 20 ms through `repository.insert_jobs`:
- the API through the real ASGI app (FastAPI's TestClient, httpx): an org's latest jobs, its
  failed jobs (the list by status), one job, its events, `/metrics` (its queue gauges are
  cached 5 s, as in production) and the queue-stats query uncached;
- the claim statement (10 jobs, rolled back so the queue stays the same);
- a retention pass deleting the oldest day of jobs with their events (`retention.prune`,
  500 jobs per transaction, events first), and the writer's longest submit during it vs before
  it; then the next day with `cascade=True` (the jobs alone, the foreign key takes the events).

`partitioned` replaces `job_event` by the same table partitioned by month of `ts` (an
experiment, not a revision): the events reads and the retention pass then probe every partition,
and "drop a month" is timed as what partitioning would give retention instead.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from heimdex_api.app import create_app
from heimdex_api.auth import issue_token
from heimdex_common.db import make_engine
from heimdex_common.ledger import repository, retention
from heimdex_common.localpg import LocalPostgres
from heimdex_common.migrations.config import alembic_config
from heimdex_common.settings import Ages, RetentionPolicy, Settings

SECRET = "bench-secret-for-heimdex-ledger-scale-0123"  # noqa: S105 - a throwaway cluster
CHUNK = 250_000
WRITER_PERIOD = 0.02
SERVER_SETTINGS = {
    "shared_buffers": "2GB",
    "maintenance_work_mem": "512MB",
    "max_wal_size": "32GB",
    "checkpoint_timeout": "30min",
    "effective_cache_size": "8GB",
}


def _load_jobs(orgs: int, days: int, total: int) -> str:
    """One chunk of jobs [lo, hi) with their events; created_at ascends with g, as inserts do."""
    return f"""
WITH ins AS (
    INSERT INTO job (org_id, type, status, params, request_fingerprint, created_at, updated_at,
                     run_at, started_at, finished_at, attempt, progress, stage, result)
    SELECT o.org, 'mock_process', s.status, '{{"stage_seconds": 0.1}}'::jsonb, md5(g::text),
           t, t + interval '3 seconds', t, t + interval '1 second',
           CASE WHEN s.status = 'queued' THEN NULL ELSE t + interval '3 seconds' END,
           CASE WHEN s.status IN ('failed', 'dead_letter') THEN 4 ELSE 0 END,
           CASE WHEN s.status = 'succeeded' THEN 100 ELSE 30 END, 'indexing',
           CASE WHEN s.status = 'succeeded' THEN '{{"stages": 3}}'::jsonb END
      FROM generate_series(:lo, :hi - 1) AS g
     CROSS JOIN LATERAL (SELECT now() - make_interval(days => {days})
                                + make_interval(secs => g * {days} * 86400.0 / {total}) AS t) AS ts
     CROSS JOIN LATERAL (SELECT (CAST(:orgs AS uuid[]))[1 + (hashint4(g) & 2147483647) % {orgs}]
                                AS org) AS o
     CROSS JOIN LATERAL (SELECT CAST(CASE WHEN g % 1000 < 10 THEN 'failed'
                                          WHEN g % 1000 < 20 THEN 'dead_letter'
                                          WHEN g % 1000 < 30 THEN 'canceled'
                                          WHEN g % 1000 = 30 THEN 'queued'
                                          ELSE 'succeeded' END AS job_status) AS status) AS s
    RETURNING id, created_at, status
)
INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
SELECT ins.id, ins.created_at + make_interval(secs => k * 0.5),
       CASE WHEN k = 1 THEN NULL WHEN k = 2 THEN 'queued' ELSE 'running' END,
       CASE WHEN k = 1 THEN 'queued' WHEN k < :events THEN 'running' ELSE ins.status::text END,
       jsonb_build_object('action', CASE WHEN k = 1 THEN 'submitted' WHEN k = 2 THEN 'claimed'
                                         ELSE 'stage' END,
                          'attempt', 0, 'worker', 'bench-host:4242', 'stage', 'indexing')
  FROM ins CROSS JOIN generate_series(1, :events) AS k
"""


def _partition_job_event(engine: Engine, days: int) -> None:
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE job_event"))
        conn.execute(
            text("""
CREATE TABLE job_event (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    job_id uuid NOT NULL REFERENCES job (id) ON DELETE CASCADE,
    ts timestamptz DEFAULT now() NOT NULL,
    prev_status varchar(50),
    next_status varchar(50) NOT NULL,
    detail_json jsonb,
    PRIMARY KEY (id, ts)
) PARTITION BY RANGE (ts)""")
        )
        conn.execute(text("CREATE INDEX ON job_event (job_id, ts)"))
        conn.execute(text("CREATE INDEX ON job_event (ts)"))
        first = conn.execute(
            text("SELECT date_trunc('month', now() - make_interval(days => :d + 1))"), {"d": days}
        ).scalar_one()
        month = 0
        while True:
            lo, hi, done = conn.execute(
                text(
                    "SELECT CAST(:f AS timestamptz) + make_interval(months => :m),"
                    " CAST(:f AS timestamptz) + make_interval(months => :m + 1),"
                    " CAST(:f AS timestamptz) + make_interval(months => :m)"
                    "   > now() + interval '1 month'"
                ),
                {"f": first, "m": month},
            ).one()
            if done:
                break
            conn.execute(
                text(
                    f"CREATE TABLE job_event_m{month} PARTITION OF job_event"
                    f" FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"
                )
            )
            month += 1


@dataclass
class Writer:
    """Submits one job every WRITER_PERIOD (due in a day: the claim's queue stays the same)."""

    engine: Engine
    org: uuid.UUID = field(default_factory=uuid.uuid4)
    samples: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        job = repository.NewJob(
            org_id=self.org,
            type="noop",
            params={},
            request_fingerprint="0" * 64,
            run_at=datetime.now(UTC) + timedelta(days=1),
        )
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            while not self.stop.is_set():
                start = time.perf_counter()
                repository.insert_jobs(conn, [job])
                self.samples.append((start, time.perf_counter() - start))
                time.sleep(max(0.0, WRITER_PERIOD - (time.perf_counter() - start)))

    def longest(self, since: float, until: float) -> float:
        return max((s for t, s in self.samples if since <= t <= until), default=0.0)


EVENTS_OF_JOB = (
    "SELECT id, ts, prev_status, next_status, detail_json FROM job_event"
    " WHERE job_id = :id ORDER BY ts, id"
)


def _pages(conn: Any, sql: str, params: dict[str, Any]) -> int:
    plan = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}"), params).scalar_one()
    top = plan[0]["Plan"]
    return int(top["Shared Hit Blocks"] + top["Shared Read Blocks"])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _timed(samples: int, call: Callable[[int], Any]) -> tuple[float, float]:
    for i in range(min(20, samples)):  # warm up: pool, plans, caches
        call(i)
    times = []
    for i in range(samples):
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
    return _pct(times, 0.5) * 1000, _pct(times, 0.99) * 1000


@contextmanager
def _cluster() -> Iterator[LocalPostgres]:
    cluster = LocalPostgres.throwaway(durable=True).start()
    try:
        engine = make_engine(cluster.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            for name, value in SERVER_SETTINGS.items():
                conn.execute(text(f"ALTER SYSTEM SET {name} = '{value}'"))
        engine.dispose()
        cluster.stop()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


def run_one(  # noqa: PLR0915 - one scenario, start to end, reads best in one place
    jobs: int, layout: str, *, orgs: int, days: int, events: int, samples: int
) -> dict[str, tuple[float, float]]:
    results: dict[str, tuple[float, float]] = {}
    with _cluster() as cluster:
        url = cluster.url()
        command.upgrade(alembic_config(database_url=url), "head")
        engine = make_engine(url, pool_size=4)
        if layout == "partitioned":
            _partition_job_event(engine, days)
        org_ids = [uuid.uuid4() for _ in range(orgs)]
        started = time.monotonic()
        sql = text(_load_jobs(orgs, days, jobs))
        for lo in range(0, jobs, CHUNK):
            with engine.begin() as conn:
                conn.execute(
                    sql, {"lo": lo, "hi": min(jobs, lo + CHUNK), "orgs": org_ids, "events": events}
                )
            print(f"  loaded {min(jobs, lo + CHUNK):,} jobs, {time.monotonic() - started:.0f}s",
                  flush=True)  # fmt: skip
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE job, job_event"))
            conn.execute(text("CHECKPOINT"))
            sizes = conn.execute(
                text(
                    "SELECT pg_size_pretty(pg_total_relation_size('job')),"
                    " (SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid)))"
                    "    FROM pg_class c"
                    "   WHERE c.relname LIKE 'job_event%' AND c.relkind IN ('r', 'p')),"
                    " (SELECT count(*) FROM job_event)"
                )
            ).one()
        load_seconds = time.monotonic() - started
        print(
            f"  {jobs:,} jobs ({sizes[0]}), {sizes[2]:,} events ({sizes[1]}), loaded and"
            f" vacuumed in {load_seconds:.0f}s",
            flush=True,
        )
        results["load + VACUUM ANALYZE, s"] = (load_seconds, load_seconds)

        with engine.connect() as conn:
            picks = conn.execute(
                text(
                    "SELECT id, org_id FROM job TABLESAMPLE SYSTEM (1)"
                    " WHERE status <> 'queued' LIMIT :n"
                ),
                {"n": samples + 20},
            ).all()
        tokens = {o: {"Authorization": f"Bearer {issue_token(SECRET, org_id=o)}"} for o in org_ids}
        settings = Settings(
            DATABASE_URL=url.render_as_string(hide_password=False),
            HEIMDEX_JWT_SECRET=SECRET,
            HEIMDEX_LOG_LEVEL="warning",
        )
        writer = Writer(engine)
        thread = threading.Thread(target=writer.run, daemon=True)
        thread.start()
        try:
            with TestClient(create_app(settings)) as client:

                def get(path: str, org: uuid.UUID) -> None:
                    resp = client.get(path, headers=tokens[org])
                    assert resp.status_code == 200, resp.text

                def org(i: int) -> uuid.UUID:
                    return org_ids[i % len(org_ids)]

                def pick(i: int) -> Any:
                    return picks[i % len(picks)]

                results["GET /jobs (latest 50)"] = _timed(samples, lambda i: get("/jobs", org(i)))
                results["GET /jobs?status=failed"] = _timed(
                    samples, lambda i: get("/jobs?status=failed", org(i))
                )
                results["GET /jobs?status=running (none)"] = _timed(
                    samples, lambda i: get("/jobs?status=running", org(i))
                )
                results["GET /jobs/{id}"] = _timed(
                    samples, lambda i: get(f"/jobs/{pick(i).id}", pick(i).org_id)
                )
                results["GET /jobs/{id}/events"] = _timed(
                    samples, lambda i: get(f"/jobs/{pick(i).id}/events", pick(i).org_id)
                )
                results["GET /metrics (5 s cache)"] = _timed(
                    samples, lambda i: client.get("/metrics").raise_for_status()
                )

            def stats(_: int) -> None:
                with engine.connect() as conn:
                    repository.queue_stats(conn)

            results["queue stats query (uncached)"] = _timed(samples, stats)
            # Pages read per events lookup: what the layout costs, free of the machine's noise.
            with engine.connect() as conn:
                pages = [
                    _pages(conn, EVENTS_OF_JOB, {"id": p.id}) for p in picks[: min(100, samples)]
                ]
            results["events of a job, pages read"] = (
                statistics.median(pages),
                _pct([float(p) for p in pages], 0.99),
            )

            def claim(_: int) -> None:
                with engine.connect() as conn:
                    repository.claim(conn, worker_id="bench", limit=10, lease_seconds=30)
                    conn.rollback()

            results["claim 10 (rolled back)"] = _timed(samples, claim)

            before = time.perf_counter()
            time.sleep(5)
            policy = RetentionPolicy(Ages(timedelta(days=days - 1), timedelta(days=days - 1)))
            with engine.connect() as conn:
                would = retention.dry_run(conn, policy)
            batch_times: list[float] = []

            class Observer:
                def batch(self, status: Any, jobs: int, events: int, seconds: float) -> None:
                    batch_times.append(seconds)

                def finished(self, result: retention.PruneResult) -> None:
                    pass

            pass_start = time.perf_counter()
            result = retention.prune(engine, policy, observer=Observer(), cascade=False)
            pass_end = time.perf_counter()
            events_first = list(batch_times)
            time.sleep(2)
            # The next day's jobs, their events taken by the foreign key's cascade instead.
            batch_times.clear()
            cascade_policy = RetentionPolicy(
                Ages(timedelta(days=days - 2), timedelta(days=days - 2))
            )
            cascade_start = time.perf_counter()
            cascaded = retention.prune(engine, cascade_policy, observer=Observer(), cascade=True)
            cascade_end = time.perf_counter()
            time.sleep(1)
        finally:
            writer.stop.set()
            thread.join()
        # The cutoff moves with the clock: a job or two may come of age after the dry run.
        assert result.jobs >= would.jobs, (result.jobs, would.jobs)
        print(
            f"  retention: {result.jobs:,} jobs, {result.events:,} events in {result.batches}"
            f" batches, {result.seconds:.1f}s ({result.jobs / max(result.seconds, 1e-9):,.0f}"
            " jobs/s)",
            flush=True,
        )
        results["retention batch (500 jobs)"] = (
            _pct(events_first, 0.5) * 1000,
            _pct(events_first, 0.99) * 1000,
        )
        results["retention pass, s"] = (result.seconds, result.seconds)
        results["writer submit, before the pass"] = (
            statistics.median(s for t, s in writer.samples if before <= t < pass_start) * 1000,
            writer.longest(before, pass_start) * 1000,
        )
        results["writer submit, during the pass"] = (
            statistics.median(s for t, s in writer.samples if pass_start <= t <= pass_end) * 1000,
            writer.longest(pass_start, pass_end) * 1000,
        )
        results["cascade: retention batch"] = (
            _pct(batch_times, 0.5) * 1000,
            _pct(batch_times, 0.99) * 1000,
        )
        results["cascade: pass, s"] = (cascaded.seconds, cascaded.seconds)
        cascade_samples = [s for t, s in writer.samples if cascade_start <= t <= cascade_end]
        results["cascade: writer during the pass"] = (
            statistics.median(cascade_samples) * 1000,
            writer.longest(cascade_start, cascade_end) * 1000,
        )
        if layout == "partitioned":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                start = time.perf_counter()
                conn.execute(text("ALTER TABLE job_event DETACH PARTITION job_event_m0"))
                conn.execute(text("DROP TABLE job_event_m0"))
                took = (time.perf_counter() - start) * 1000
            results["detach + drop the oldest month, ms"] = (took, took)
        engine.dispose()
    return results


def _ratio(last: tuple[float, float], first: tuple[float, float]) -> str:
    return f"{last[1] / max(first[1], 1e-9):.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", default="1000000,10000000", help="sizes, comma-separated")
    parser.add_argument(
        "--layout", default="plain", help="plain, partitioned, or both: plain,partitioned"
    )
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--days", type=int, default=90, help="the history's span")
    parser.add_argument("--events-per-job", type=int, default=5)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    sizes = [int(s) for s in args.jobs.split(",")]
    layouts = args.layout.split(",")
    table: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}
    for layout in layouts:
        for n in sizes:
            print(f"{layout}, {n:,} jobs ...", flush=True)
            table[(layout, n)] = run_one(
                n,
                layout,
                orgs=args.orgs,
                days=args.days,
                events=args.events_per_job,
                samples=args.samples,
            )
            for measure, (p50, p99) in table[(layout, n)].items():
                print(f"  {measure:<34} {p50:10.2f} {p99:10.2f}", flush=True)
    columns = [(layout, n) for layout in layouts for n in sizes]
    head = "".join(f" | {layout} {n / 1e6:g}M p50 / p99" for layout, n in columns)
    ratio = len(sizes) > 1
    print(f"\nms unless said; p50 / p99 of {args.samples} samples\n")
    print(
        f"| measure{head}"
        + (f" | p99 {sizes[-1] / 1e6:g}M / {sizes[0] / 1e6:g}M" if ratio else "")
        + " |"
    )
    print("|---" * (1 + len(columns) + ratio) + "|")
    for measure in table[columns[0]]:
        cells = "".join(
            f" | {table[c][measure][0]:.2f} / {table[c][measure][1]:.2f}" for c in columns
        )
        ratios = ""
        if ratio:
            ratios = " |" + ",".join(
                f" {_ratio(table[(lay, sizes[-1])][measure], table[(lay, sizes[0])][measure])}"
                for lay in layouts
            )
        print(f"| {measure}{cells}{ratios} |")


if __name__ == "__main__":
    main()
