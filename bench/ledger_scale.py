"""The ledger at scale: p50/p99 of the API's reads, the claim and a retention pass, at N jobs.

    uv run python bench/ledger_scale.py --jobs 1000000,10000000
    uv run python bench/ledger_scale.py --jobs 1000000 --layout plain,partitioned
    uv run python bench/ledger_scale.py --jobs 1000000 --load-only     # the load time alone
    uv run python bench/ledger_scale.py --jobs 1000000 --retention 500:0,500:1 --passes 4
    uv run python bench/ledger_scale.py --jobs 1000000,10000000 \
        --shared-buffers 18GB --huge-pages --prewarm               # in memory (see below)

For each size (and each `job_event` layout) a throwaway PostgreSQL cluster (fsync on) is
migrated to head, then loaded in SQL (INSERT ... SELECT over generate_series, logged tables): N
jobs over `--orgs` orgs and `--days` days (1% failed, 1% dead_letter, 1% canceled, 0.1% queued,
the rest succeeded) with `--events-per-job` events each. The load reads the indexes and the
primary key, unique and foreign key constraints of `job` and `job_event` from the catalog
(`pg_get_indexdef`, `pg_get_constraintdef`), drops them, inserts in chunks of 250,000 jobs, then
rebuilds them under those names and definitions (parallel maintenance workers, 1 GB of
maintenance_work_mem; the foreign key last, validated in one join) and fails unless the catalog
then reads exactly as before; then VACUUM ANALYZE and a checkpoint. Progress is printed per chunk
and per index with the elapsed seconds. `--load-only` stops there.

The server runs with `--shared-buffers` (default 2GB). `--prewarm` then reads what the measured
statements use into shared buffers (`pg_prewarm`, the extension created and dropped again):
`job` and `job_event` with their indexes but `job_event`'s on `ts` (inserts only touch its
right edge; a new event's random-UUID key lands on any page of the primary key); it reports
how much of each stayed there: the steady state of a
server whose memory holds its ledger, against the cold reads of a just-loaded one whose kernel
may drop the page cache.

Then, while a writer submits a job every 20 ms through `repository.insert_jobs` (its commit timed
apart: a commit waits for the WAL written before it):
- the API through the real ASGI app (FastAPI's TestClient, httpx): an org's latest jobs, its
  failed jobs (the list by status), one job, its events, `/metrics` (its queue gauges are
  cached 5 s, as in production) and the queue-stats query uncached;
- the claim statement (10 jobs, rolled back so the queue stays the same);
- `--passes` rounds (default 1) of retention passes (`retention.prune`): per `--retention` config
  (`default`: the settings' batch and pause factor; `BATCH:PAUSE_FACTOR`, e.g. `500:0` for
  unpaced 500-job batches), one pass over the oldest day left with the events deleted first and
  one over the next day with the foreign key's cascade taking them, 2 s apart. Each pass prints
  its batches, the WAL it wrote (`pg_stat_wal`: bytes, full-page images, sync time) and the
  writer's longest submit and commit during it; the table gives, per config, the batch p50/p99
  and the median and max over passes of the pass time, the writer's longest submit and commit,
  and the WAL; and the writer's submits while no pass runs.

`partitioned` replaces `job_event` by the same table partitioned by month of `ts` (an
experiment, not a revision): the events reads and the retention pass then probe every partition,
and "drop a month" is timed as what partitioning would give retention instead. Its indexes and
keys are dropped and rebuilt the same way (a partitioned index is rebuilt without `ON ONLY`, so
one statement builds it on every partition, as before the load).
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
from pathlib import Path
from typing import Any

from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from heimdex.db import make_engine
from heimdex.ledger import repository, retention
from heimdex.settings import Ages, RetentionPolicy, Settings
from heimdex_api.app import create_app
from heimdex_api.auth import issue_token
from heimdex_db.config import alembic_config
from heimdex_db.localpg import LocalPostgres

SECRET = "bench-secret-for-heimdex-ledger-scale-0123"  # noqa: S105 - a throwaway cluster
CHUNK = 250_000
WRITER_PERIOD = 0.02
REBUILD_SETTINGS = {  # the session that rebuilds the indexes and validates the foreign key
    "maintenance_work_mem": "1GB",
    "max_parallel_maintenance_workers": "2",
    "work_mem": "256MB",
}
SERVER_SETTINGS = {
    "maintenance_work_mem": "512MB",
    "max_parallel_maintenance_workers": "2",
    "track_wal_io_timing": "on",
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


# The schema the loader takes apart and puts back, read from the catalog (never hard-coded, so the
# bench follows the migrations): the indexes and the primary key, unique and foreign key
# constraints of `job`, `job_event` and its partitions (the partitioned layout).
_OURS = "(c.relname = 'job' OR c.relname ~ '^job_event')"
_INDEXES = f"""
SELECT c.relname AS tbl, i.relname AS name, pg_get_indexdef(i.oid) AS def,
       con.conname AS constraint_name, c.relispartition AS partition, x.indisvalid AS valid
  FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class c ON c.oid = x.indrelid
  LEFT JOIN pg_constraint con ON con.conindid = i.oid AND con.conrelid = c.oid
                             AND con.contype IN ('p', 'u', 'x')
 WHERE c.relnamespace = 'public'::regnamespace AND {_OURS}
 ORDER BY 1, 2"""
_CONSTRAINTS = f"""
SELECT c.relname AS tbl, con.conname AS name, con.contype AS type,
       pg_get_constraintdef(con.oid) AS def, con.convalidated AS valid,
       c.relispartition AS partition, con.conparentid <> 0 AS inherited
  FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
 WHERE c.relnamespace = 'public'::regnamespace AND con.contype IN ('p', 'u', 'x', 'f')
   AND ({_OURS} OR con.confrelid IN (SELECT oid FROM pg_class WHERE relname = 'job'
                                       AND relnamespace = 'public'::regnamespace))
 ORDER BY 1, 2"""


@dataclass(frozen=True)
class Schema:
    """The catalog's definitions of what the fast load drops and rebuilds."""

    indexes: tuple[tuple[Any, ...], ...]
    constraints: tuple[tuple[Any, ...], ...]

    @classmethod
    def read(cls, conn: Any) -> Schema:
        return cls(
            tuple(tuple(r) for r in conn.execute(text(_INDEXES)).all()),
            tuple(tuple(r) for r in conn.execute(text(_CONSTRAINTS)).all()),
        )

    def diff(self, other: Schema) -> list[str]:
        lines = [
            f"- {r}"
            for r in self.indexes + self.constraints
            if r not in set(other.indexes + other.constraints)
        ]
        return lines + [
            f"+ {r}"
            for r in other.indexes + other.constraints
            if r not in set(self.indexes + self.constraints)
        ]


def _drop_schema(conn: Any, schema: Schema) -> None:
    """Foreign keys, then primary keys and unique constraints, then the other indexes: of the
    tables themselves (a partition's follow its parent's)."""
    top = [c for c in schema.constraints if not c[5] and not c[6]]
    for tbl, name, *_ in (c for c in top if c[2] == "f"):
        conn.execute(text(f'ALTER TABLE "{tbl}" DROP CONSTRAINT "{name}"'))
    for tbl, name, *_ in (c for c in top if c[2] != "f"):
        conn.execute(text(f'ALTER TABLE "{tbl}" DROP CONSTRAINT "{name}"'))
    for _tbl, name, _def, constraint, partition, _valid in schema.indexes:
        if constraint is None and not partition:
            conn.execute(text(f'DROP INDEX IF EXISTS "{name}"'))


def _rebuild_schema(conn: Any, schema: Schema, started: float) -> None:
    """Back as the migrations made them, from the definitions read before the load."""
    for name, value in REBUILD_SETTINGS.items():
        conn.execute(text(f"SET {name} = '{value}'"))
    top = [c for c in schema.constraints if not c[5] and not c[6]]
    steps = [
        (f"primary key/unique {name} on {tbl}", f'ALTER TABLE "{tbl}" ADD CONSTRAINT "{name}" {d}')
        for tbl, name, kind, d, *_ in top
        if kind != "f"
    ]
    # A partitioned table's index reads "ON ONLY parent" (as pg_dump attaches the partitions'
    # one by one); without ONLY one statement builds it on every partition too.
    steps += [
        (f"index {name} on {tbl}", d.replace(f" ON ONLY public.{tbl} ", f" ON public.{tbl} "))
        for tbl, name, d, constraint, partition, _valid in schema.indexes
        if constraint is None and not partition
    ]
    steps += [
        (f"foreign key {name} on {tbl}", f'ALTER TABLE "{tbl}" ADD CONSTRAINT "{name}" {d}')
        for tbl, name, kind, d, *_ in top
        if kind == "f"
    ]
    for what, ddl in steps:
        step = time.monotonic()
        conn.execute(text(ddl))
        print(f"  built {what}: {time.monotonic() - step:.0f}s,"
              f" {time.monotonic() - started:.0f}s in all", flush=True)  # fmt: skip


def load(engine: Engine, jobs: int, *, orgs: list[uuid.UUID], days: int, events: int) -> float:
    """N jobs and their events, the indexes and keys dropped first and rebuilt after (as the
    catalog had them, checked), then VACUUM ANALYZE and a checkpoint; returns the seconds."""
    started = time.monotonic()
    with engine.begin() as conn:
        migrated = Schema.read(conn)
        _drop_schema(conn, migrated)
    print(f"  dropped {len(migrated.indexes)} indexes and"
          f" {len(migrated.constraints)} constraints read from the catalog"
          " (partitions' included, with their parents')",
          flush=True)  # fmt: skip
    sql = text(_load_jobs(len(orgs), days, jobs))
    for lo in range(0, jobs, CHUNK):
        with engine.begin() as conn:
            conn.execute(
                sql, {"lo": lo, "hi": min(jobs, lo + CHUNK), "orgs": orgs, "events": events}
            )
        print(f"  loaded {min(jobs, lo + CHUNK):,} jobs, {time.monotonic() - started:.0f}s",
              flush=True)  # fmt: skip
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        _rebuild_schema(conn, migrated, started)
        rebuilt = Schema.read(conn)
        if rebuilt != migrated:
            raise SystemExit(
                "the rebuilt indexes and constraints differ from the migrated ones:\n"
                + "\n".join(migrated.diff(rebuilt))
            )
        print("  indexes and constraints equal the migrated ones", flush=True)
        conn.execute(text("VACUUM ANALYZE job, job_event"))
        conn.execute(text("CHECKPOINT"))
    print(f"  vacuumed and analyzed, {time.monotonic() - started:.0f}s", flush=True)
    return time.monotonic() - started


@dataclass
class Writer:
    """Submits one job every WRITER_PERIOD (due in a day: the claim's queue stays the same),
    timing the submit and, apart, its commit (where it waits for WAL written before it)."""

    engine: Engine
    org: uuid.UUID = field(default_factory=uuid.uuid4)
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # start, s, commit
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        job = repository.NewJob(
            org_id=self.org,
            type="noop",
            params={},
            request_fingerprint="0" * 64,
            run_at=datetime.now(UTC) + timedelta(days=1),
        )
        with self.engine.connect() as conn:
            while not self.stop.is_set():
                start = time.perf_counter()
                repository.insert_jobs(conn, [job])
                committing = time.perf_counter()
                conn.commit()
                end = time.perf_counter()
                self.samples.append((start, end - start, end - committing))
                time.sleep(max(0.0, WRITER_PERIOD - (time.perf_counter() - start)))

    def during(self, since: float, until: float) -> list[tuple[float, float, float]]:
        return [s for s in self.samples if since <= s[0] <= until]

    def longest(self, since: float, until: float) -> float:
        return max((s for _, s, _ in self.during(since, until)), default=0.0)


@dataclass
class PassStats:
    """One retention pass beside the writer."""

    kind: str
    result: retention.PruneResult
    batches: list[float]
    writer_longest: float
    commit_longest: float
    wal_bytes: float
    wal_fpi: float
    wal_sync_ms: float


@dataclass
class BatchTimes:
    """A retention observer keeping each batch's seconds."""

    times: list[float] = field(default_factory=list)

    def batch(self, status: Any, jobs: int, events: int, seconds: float) -> None:
        self.times.append(seconds)

    def finished(self, result: retention.PruneResult) -> None:
        pass


# WAL bytes from the insert position (exact); full-page images and sync time from pg_stat_wal,
# which backends update up to a second late (a pass's figures may land in the next pass's).
_WAL = text(
    "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0') AS wal_bytes, wal_fpi,"
    " wal_sync_time FROM pg_stat_wal"
)


def _retention_config(spec: str) -> tuple[str, int, float]:
    """`default` (the settings' defaults) or BATCH:PAUSE_FACTOR, e.g. 500:0 (no pacing)."""
    if spec == "default":
        return spec, retention.DEFAULT_BATCH_SIZE, retention.DEFAULT_PAUSE_FACTOR
    batch, pause = spec.split(":")
    return spec, int(batch), float(pause)


def _retention(
    engine: Engine, writer: Writer, *, days: int, configs: list[str], passes: int
) -> tuple[dict[str, tuple[float, float]], list[tuple[float, float]]]:
    """`passes` rounds of, for each config, a pass over the oldest day left with the events
    deleted first and one over the next day with the cascade taking them; 2 s quiet before each.
    Returns the rows and the (start, end) of every pass."""
    stats: dict[str, list[PassStats]] = {c: [] for c in configs}
    windows: list[tuple[float, float]] = []
    day = days - 1
    for _ in range(passes):
        for spec in configs:
            label, batch, pause = _retention_config(spec)
            for cascade in (False, True):
                time.sleep(2)
                policy = RetentionPolicy(Ages(timedelta(days=day), timedelta(days=day)))
                day -= 1
                with engine.connect() as conn:
                    would = retention.dry_run(conn, policy)
                    wal0 = conn.execute(_WAL).one()
                observer = BatchTimes()
                start = time.perf_counter()
                result = retention.prune(
                    engine,
                    policy,
                    batch_size=batch,
                    pause_factor=pause,
                    observer=observer,
                    cascade=cascade,
                )
                end = time.perf_counter()
                with engine.connect() as conn:
                    wal1 = conn.execute(_WAL).one()
                # The cutoff moves with the clock: a job or two may come of age after the dry run.
                assert result.jobs >= would.jobs, (result.jobs, would.jobs)
                windows.append((start, end))
                during = writer.during(start, end)
                one = PassStats(
                    "cascade" if cascade else "events first",
                    result,
                    observer.times,
                    max((s for _, s, _ in during), default=0.0),
                    max((c for _, _, c in during), default=0.0),
                    float(wal1.wal_bytes - wal0.wal_bytes),
                    float(wal1.wal_fpi - wal0.wal_fpi),
                    float(wal1.wal_sync_time - wal0.wal_sync_time),
                )
                stats[spec].append(one)
                print(
                    f"  retention {label} ({batch} jobs/batch, pause x{pause:g}), {one.kind}:"
                    f" {result.jobs:,} jobs, {result.events:,} events in {result.batches}"
                    f" batches, {result.seconds:.1f}s (paused {result.paused_seconds:.1f}s);"
                    f" batch p50 {_pct(observer.times, 0.5) * 1000:.0f} ms, longest"
                    f" {max(observer.times, default=0) * 1000:.0f} ms; WAL"
                    f" {one.wal_bytes / 2**20:.1f} MB, {one.wal_fpi:.0f} full-page images, sync"
                    f" {one.wal_sync_ms:.0f} ms; writer's longest submit"
                    f" {one.writer_longest * 1000:.1f} ms (its commit"
                    f" {one.commit_longest * 1000:.1f} ms)",
                    flush=True,
                )
    rows: dict[str, tuple[float, float]] = {}
    for spec, passes_of in stats.items():
        label = f"retention {spec}"
        batches = [b for p in passes_of for b in p.batches]
        rows[f"{label}: batch"] = (_pct(batches, 0.5) * 1000, _pct(batches, 0.99) * 1000)
        for name, values in (
            ("pass, s (med / max)", [p.result.seconds for p in passes_of]),
            ("writer longest, ms (med / max)", [p.writer_longest * 1000 for p in passes_of]),
            ("its commit, ms (med / max)", [p.commit_longest * 1000 for p in passes_of]),
            ("WAL MB per pass (med / max)", [p.wal_bytes / 2**20 for p in passes_of]),
        ):
            rows[f"{label}: {name}"] = (statistics.median(values), max(values))
    return rows, windows


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


def _bytes(size: str) -> int:
    """PostgreSQL's memory units (kB, MB, GB, TB) in bytes."""
    units = {"kB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    for unit, factor in units.items():
        if size.endswith(unit) and size.removesuffix(unit).isdigit():
            return int(size.removesuffix(unit)) * factor
    raise SystemExit(f"--shared-buffers {size!r}: a number with kB, MB, GB or TB, like 16GB")


def _check_huge_pages(shared_buffers: str) -> None:
    """Refuses to start unless the kernel has free huge pages for the shared buffers."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    info = {line.split(":")[0]: int(line.split()[1]) for line in meminfo}
    page = info.get("Hugepagesize", 2048) * 1024
    need = -(-int(_bytes(shared_buffers) * 1.03) // page)  # plus PostgreSQL's other shared memory
    if info.get("HugePages_Free", 0) < need:
        raise SystemExit(
            f"--huge-pages: {need} free huge pages needed for shared_buffers {shared_buffers},"
            f" {info.get('HugePages_Free', 0)} free; as root: sysctl -w vm.nr_hugepages={need}"
        )


@contextmanager
def _cluster(shared_buffers: str, huge_pages: bool) -> Iterator[LocalPostgres]:
    if huge_pages:
        _check_huge_pages(shared_buffers)
    cluster = LocalPostgres.throwaway(durable=True).start()
    try:
        engine = make_engine(cluster.url(), isolation_level="AUTOCOMMIT")
        settings = {**SERVER_SETTINGS, "shared_buffers": shared_buffers}
        if huge_pages:
            settings["huge_pages"] = "on"
        with engine.connect() as conn:
            for name, value in settings.items():
                conn.execute(text(f"ALTER SYSTEM SET {name} = '{value}'"))
        engine.dispose()
        cluster.stop()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


def _prewarm(engine: Engine) -> None:
    """Reads what the measured statements use into shared buffers: `job` with its indexes and
    `job_event` with its indexes but the one on `ts` (inserts only touch its right edge;
    those into the primary key, a random UUID, land anywhere), job_event first (what does not
    fit is evicted first from what was read first). Then prints how much of each the buffers
    hold (pg_buffercache)."""
    ours = (
        "SELECT c.oid, c.relname, c.relfilenode, pg_relation_size(c.oid) AS bytes"
        " FROM pg_class c LEFT JOIN pg_index i ON i.indexrelid = c.oid"
        " WHERE c.relkind IN ('r', 'i') AND coalesce(i.indrelid, c.oid) IN"
        "  (SELECT oid FROM pg_class WHERE relnamespace = current_schema()::regnamespace"
        "   AND (relname = 'job' OR relname LIKE 'job\\_event%'))"
        " AND c.relname NOT LIKE 'idx\\_job\\_event\\_\\_ts%'"
        " ORDER BY coalesce(i.indrelid, c.oid)::regclass::text = 'job', c.relkind = 'r', c.relname"
    )
    started = time.monotonic()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_prewarm"))
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_buffercache"))
        rows = conn.execute(text(ours)).all()
        for row in rows:
            conn.execute(text("SELECT pg_prewarm(:oid)"), {"oid": row.oid})
        held = {
            r.relfilenode: r.bytes
            for r in conn.execute(
                text(
                    "SELECT relfilenode, count(*) * 8192 AS bytes FROM pg_buffercache"
                    " WHERE reldatabase = (SELECT oid FROM pg_database"
                    "  WHERE datname = current_database()) GROUP BY relfilenode"
                )
            )
        }
        conn.execute(text("DROP EXTENSION pg_buffercache"))
        conn.execute(text("DROP EXTENSION pg_prewarm"))
    total = sum(r.bytes for r in rows)
    kept = sum(min(r.bytes, held.get(r.relfilenode, 0)) for r in rows)
    print(
        f"  prewarmed {len(rows)} relations of {total / 2**30:.1f} GiB in"
        f" {time.monotonic() - started:.0f}s; shared buffers hold {kept / 2**30:.1f} GiB of them:",
        ", ".join(
            f"{r.relname} {min(r.bytes, held.get(r.relfilenode, 0)) / max(r.bytes, 1):.0%}"
            for r in rows
        ),
        flush=True,
    )


def run_one(  # noqa: PLR0915 - one scenario, start to end, reads best in one place
    jobs: int,
    layout: str,
    *,
    orgs: int,
    days: int,
    events: int,
    samples: int,
    configs: list[str],
    passes: int,
    shared_buffers: str = "2GB",
    huge_pages: bool = False,
    prewarm: bool = False,
    load_only: bool = False,
) -> dict[str, tuple[float, float]]:
    results: dict[str, tuple[float, float]] = {}
    with _cluster(shared_buffers, huge_pages) as cluster:
        url = cluster.url()
        command.upgrade(alembic_config(database_url=url), "head")
        engine = make_engine(url, pool_size=4)
        if layout == "partitioned":
            _partition_job_event(engine, days)
        org_ids = [uuid.uuid4() for _ in range(orgs)]
        load_seconds = load(engine, jobs, orgs=org_ids, days=days, events=events)
        with engine.connect() as conn:
            sizes = conn.execute(
                text(
                    "SELECT pg_size_pretty(pg_total_relation_size('job')),"
                    " (SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid)))"
                    "    FROM pg_class c"
                    "   WHERE c.relname LIKE 'job_event%' AND c.relkind IN ('r', 'p')),"
                    " (SELECT count(*) FROM job_event)"
                )
            ).one()
        print(
            f"  {jobs:,} jobs ({sizes[0]}), {sizes[2]:,} events ({sizes[1]}), loaded and"
            f" vacuumed in {load_seconds:.0f}s",
            flush=True,
        )
        results["load + VACUUM ANALYZE, s"] = (load_seconds, load_seconds)
        if load_only:
            return results
        if prewarm:
            _prewarm(engine)

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

            retention_rows, windows = _retention(
                engine, writer, days=days, configs=configs, passes=passes
            )
            time.sleep(1)
        finally:
            writer.stop.set()
            thread.join()
        results.update(retention_rows)
        quiet = [
            sample
            for sample in writer.samples
            if writer.samples[0][0] + 1 <= sample[0]
            and not any(a <= sample[0] <= b for a, b in windows)
        ]
        outside = [s for _, s, _ in quiet]
        results["writer submit, no pass running"] = (
            statistics.median(outside) * 1000,
            _pct(outside, 0.99) * 1000,
        )
        results["writer's longest, no pass running"] = (max(outside) * 1000, max(outside) * 1000)
        commits = [c for _, _, c in quiet]
        results["writer's commit, no pass running"] = (
            statistics.median(commits) * 1000,
            max(commits) * 1000,
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
    parser.add_argument(
        "--shared-buffers", default="2GB", help="the server's shared_buffers (default 2GB)"
    )
    parser.add_argument(
        "--huge-pages",
        action="store_true",
        help="run the server with huge_pages=on (needs vm.nr_hugepages: the bench says how many)",
    )
    parser.add_argument(
        "--prewarm",
        action="store_true",
        help="read job, job_event and their indexes into shared buffers before measuring",
    )
    parser.add_argument(
        "--load-only",
        action="store_true",
        help="load (and check the rebuilt schema), print the load time and stop",
    )
    parser.add_argument(
        "--passes",
        type=int,
        default=1,
        help="rounds of retention passes (each: events first, then cascade, per --retention)",
    )
    parser.add_argument(
        "--retention",
        default="default",
        help="retention configs, comma-separated: 'default' (the settings' batch and pause"
        " factor, 500:0) or BATCH:PAUSE_FACTOR, e.g. 500:0,500:1 compares unpaced and paced"
        " 500-job batches (each pass takes the oldest day left)",
    )
    args = parser.parse_args()
    configs = args.retention.split(",")
    for spec in configs:
        _retention_config(spec)
    if 2 * args.passes * len(configs) > args.days - 2:
        parser.error(f"{2 * args.passes * len(configs)} passes need more than --days {args.days}")
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
                configs=configs,
                passes=args.passes,
                shared_buffers=args.shared_buffers,
                huge_pages=args.huge_pages,
                prewarm=args.prewarm,
                load_only=args.load_only,
            )
            for measure, (p50, p99) in table[(layout, n)].items():
                print(f"  {measure:<34} {p50:10.2f} {p99:10.2f}", flush=True)
    columns = [(layout, n) for layout in layouts for n in sizes]
    head = "".join(f" | {layout} {n / 1e6:g}M p50 / p99" for layout, n in columns)
    ratio = len(sizes) > 1
    print(
        f"\nms unless said; p50 / p99 of {args.samples} samples; shared_buffers"
        f" {args.shared_buffers}{', huge pages' if args.huge_pages else ''}"
        f"{', prewarmed' if args.prewarm else ''}\n"
    )
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
