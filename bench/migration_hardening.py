"""Cost of 001_job_ledger_init -> 3af4686817cc on a realistic table: online vs previous vs naive.

Loads N job rows shaped like the field's data at 001 (mostly succeeded, some failed, retries
with a stale finished_at, terminal rows without one, long error texts), clones the database,
then runs each variant while a writer inserts a job every 10 ms and a reader lists an org's
latest jobs every 10 ms, and prints one table: wall time of the migration and the writer's and
the reader's longest stall, for every row count. The variants run interleaved over several
rounds (a noisy shared machine slows whatever runs at that moment: interleaving spreads it over
all of them), each on a fresh copy of the same seeded database; the table shows the medians,
each round's wall time and the worst stall of any round, then online/previous wall time.

    uv run python bench/migration_hardening.py            # 100,000 and 1,000,000 rows, 3 rounds
    uv run python bench/migration_hardening.py --rows 200000 --rounds 5 --variant online \\
        --variant previous --database-url postgresql://...

Variants:
- online: 3af4686817cc as it is (heimdex_db.online: new columns, batched
  backfill, NOT VALID then VALIDATE, CREATE INDEX CONCURRENTLY, a short swap);
- previous: 3af4686817cc before it went online (its transactional form, still what it compiles
  to offline: one rewrite and two index builds in one transaction under ACCESS EXCLUSIVE);
- naive: each change as its own statement, as autogenerate emits it (plus the normalisation a
  naive migration needs to pass its CHECK): several table rewrites, status updates over every
  row, rebuilt indexes, no lock_timeout.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from heimdex.settings import normalize_url
from heimdex_db.config import alembic_config
from heimdex_db.localpg import LocalPostgres, create_database

LOAD = """
INSERT INTO job (org_id, type, status, attempt, created_at, updated_at, started_at,
                 finished_at, last_error_code, last_error_message)
SELECT orgs.org, 'mock_process', s.status, s.attempt, s.created, s.created + interval '2 min',
       CASE WHEN s.status <> 'queued' THEN s.created + interval '5 s' END,
       CASE
         WHEN s.status IN ('succeeded', 'canceled') AND g % 50 <> 0
           THEN s.created + interval '2 min'
         WHEN s.status = 'failed' THEN s.created + interval '1 min'
         WHEN s.status = 'running' AND g % 3 = 0 THEN s.created + interval '1 min'
       END,
       CASE WHEN s.status = 'failed' THEN
         CASE WHEN g % 7 = 0 THEN repeat('E', 90) ELSE 'WORKER_ERROR' END END,
       CASE WHEN s.status = 'failed' THEN
         CASE WHEN g % 5 = 0 THEN repeat('Traceback line ', 400) ELSE 'boom' END END
  FROM generate_series(1, :rows) AS g
  CROSS JOIN LATERAL (
    SELECT CASE
             WHEN g % 100 < 78 THEN 'succeeded'
             WHEN g % 100 < 88 THEN 'failed'
             WHEN g % 100 < 92 THEN 'canceled'
             WHEN g % 100 < 96 THEN 'running'
             ELSE 'queued'
           END AS status,
           (g % 3) AS attempt,
           now() - (g || ' seconds')::interval AS created
  ) AS s
  CROSS JOIN LATERAL (
    SELECT ('00000000-0000-0000-0000-' || lpad(((g % 200) + 1)::text, 12, '0'))::uuid AS org
  ) AS orgs
"""

NAIVE = [
    "CREATE TYPE job_status AS ENUM "
    "('queued', 'running', 'succeeded', 'failed', 'canceled', 'dead_letter')",
    "CREATE TYPE job_backoff_policy AS ENUM ('none', 'fixed', 'exp')",
    "UPDATE job SET status = 'queued' WHERE status IN ('pending', 'queued')",
    "UPDATE job SET status = 'running' WHERE status IN ('processing', 'running')",
    "UPDATE job SET status = 'succeeded' WHERE status IN ('completed', 'succeeded')",
    "UPDATE job SET finished_at = CASE WHEN status IN ('queued', 'running') THEN NULL "
    "ELSE coalesce(finished_at, updated_at) END",
    "UPDATE job SET last_error_code = left(last_error_code, 64), "
    "last_error_message = left(last_error_message, 2048)",
    "ALTER TABLE job ADD COLUMN max_attempts INTEGER DEFAULT 5 NOT NULL",
    "ALTER TABLE job ADD COLUMN backoff_policy job_backoff_policy DEFAULT 'exp' NOT NULL",
    "ALTER TABLE job DROP CONSTRAINT ck_job_status",
    "ALTER TABLE job ALTER COLUMN status DROP DEFAULT",
    "ALTER TABLE job ALTER COLUMN status TYPE job_status USING status::job_status",
    "ALTER TABLE job ALTER COLUMN status SET DEFAULT 'queued'::job_status",
    "ALTER TABLE job ALTER COLUMN last_error_code TYPE VARCHAR(64)",
    "ALTER TABLE job ALTER COLUMN last_error_message TYPE VARCHAR(2048)",
    "DROP INDEX idx_job_org_status",
    "DROP INDEX idx_job_type_status",
    "DROP INDEX uq_job_org_idempotency",
    "CREATE INDEX idx_job__org_id_created_at_desc ON job (org_id, created_at DESC)",
    "CREATE UNIQUE INDEX idx_job__org_id_idempotency_key ON job (org_id, idempotency_key) "
    "WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX idx_job__status_created_at ON job (status, created_at)",
    "ALTER TABLE job ADD CONSTRAINT ck_job__status_finished_at_consistency CHECK ("
    "(status IN ('succeeded', 'failed', 'canceled', 'dead_letter') AND finished_at IS NOT NULL)"
    " OR (status IN ('queued', 'running') AND finished_at IS NULL))",
    "DROP INDEX idx_job_event_job_ts",
    "DROP INDEX idx_job_event_ts",
    "CREATE INDEX idx_job_event__job_id_ts ON job_event (job_id, ts)",
    "CREATE INDEX idx_job_event__ts ON job_event (ts)",
]


@dataclass
class Client:
    """Runs `statement` every `interval` seconds and records how long each one took."""

    engine: Engine
    statement: str
    interval: float = 0.010
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        org = uuid.uuid4()
        autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        with autocommit.connect() as conn:
            next_at = time.perf_counter()
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    conn.execute(text(self.statement), {"org": org}).all()
                except Exception as exc:
                    self.errors.append(type(exc).__name__)
                self.latencies.append(time.perf_counter() - start)
                next_at += self.interval
                time.sleep(max(0.0, next_at - time.perf_counter()))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


WRITE = "INSERT INTO job (org_id, type) VALUES (:org, 'noop') RETURNING id"
READ = (
    "SELECT id FROM job WHERE org_id = '00000000-0000-0000-0000-000000000007'"
    " ORDER BY created_at DESC LIMIT 20"
)


@dataclass
class Result:
    variant: str
    rows: int
    wall_s: float
    writer_stall_ms: float
    writer_p50_ms: float
    reader_stall_ms: float
    inserts: int
    errors: int


def measure(variant: str, rows: int, url: URL, migrate: Callable[[], None]) -> Result:
    engine = create_engine(url, pool_size=3)
    writer, reader = Client(engine, WRITE), Client(engine, READ)
    writer.start()
    reader.start()
    time.sleep(0.3)  # steady state before the migration starts
    start = time.perf_counter()
    migrate()
    wall = time.perf_counter() - start
    time.sleep(0.3)
    writer.stop()
    reader.stop()
    engine.dispose()
    w = writer.latencies or [0.0]
    r = reader.latencies or [0.0]
    return Result(
        variant,
        rows,
        wall,
        max(w) * 1000,
        statistics.median(w) * 1000,
        max(r) * 1000,
        len(writer.latencies),
        len(writer.errors) + len(reader.errors),
    )


def previous_config(url: URL) -> Config:
    """The history with 3af4686817cc in its transactional form (what it was before it went
    online, and still is offline), against a live database."""
    cfg = alembic_config(database_url=url)
    cfg.attributes["heimdex.3af4686817cc.transactional"] = True
    return cfg


def run_naive(url: URL) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in NAIVE:
            conn.execute(text(statement))
        conn.execute(
            text("UPDATE heimdex_private.alembic_version SET version_num = '3af4686817cc'")
        )
    engine.dispose()


VARIANTS = ("online", "previous", "naive")


def _load_seed(admin: Engine, admin_url: URL, rows: int) -> None:
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS bench_seed WITH (FORCE)"))
        create_database(conn, "bench_seed")
    seed = admin_url.set(database="bench_seed")
    command.upgrade(alembic_config(database_url=seed), "001_job_ledger_init")
    print(f"loading {rows:,} job rows at 001_job_ledger_init ...", flush=True)
    start = time.perf_counter()
    engine = create_engine(seed)
    with engine.begin() as conn:
        conn.execute(text(LOAD), {"rows": rows})
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE job"))
    engine.dispose()
    print(f"loaded in {time.perf_counter() - start:.1f} s", flush=True)


def run_rows(
    admin_url: URL, rows: int, variants: tuple[str, ...] = VARIANTS, rounds: int = 1
) -> list[Result]:
    """Every variant `rounds` times, interleaved (round 1: each variant once, then round 2 ...,
    the order rotated each round), each on a fresh copy of the same seeded database, so that
    a burst of load from elsewhere on the machine hits every variant alike."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    _load_seed(admin, admin_url, rows)
    url = admin_url.set(database="bench_run")
    migrations: dict[str, Callable[[], None]] = {
        "online": lambda: command.upgrade(alembic_config(database_url=url), "3af4686817cc"),
        "previous": lambda: command.upgrade(previous_config(url), "3af4686817cc"),
        "naive": lambda: run_naive(url),
    }
    results = []
    for round_ in range(rounds):
        shift = round_ % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            with admin.connect() as conn:
                conn.execute(text("DROP DATABASE IF EXISTS bench_run WITH (FORCE)"))
                create_database(conn, "bench_run", template="bench_seed")
            print(f"round {round_ + 1}/{rounds}: {variant} at {rows:,} rows ...", flush=True)
            results.append(measure(variant, rows, url, migrations[variant]))
    with admin.connect() as conn:
        for name in ("bench_run", "bench_seed"):
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()
    return results


def table(results: list[Result], counts: list[int], variants: tuple[str, ...]) -> list[str]:
    """Medians over the rounds (and each round's wall time), then online/previous per count."""
    median = statistics.median
    header = (
        "variant",
        "rows",
        "wall s (median)",
        "wall s per round",
        "writer max stall ms (median)",
        "writer max stall ms (worst)",
        "writer p50 ms",
        "reader max stall ms (median)",
        "reader max stall ms (worst)",
        "inserts",
        "errors",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    ratios = []
    for rows in counts:
        of = {v: [r for r in results if r.rows == rows and r.variant == v] for v in variants}
        for variant in variants:
            rs = of[variant]
            lines.append(
                f"| {variant} | {rows:,} | {median(r.wall_s for r in rs):.1f} | "
                + " / ".join(f"{r.wall_s:.1f}" for r in rs)
                + f" | {median(r.writer_stall_ms for r in rs):.0f}"
                f" | {max(r.writer_stall_ms for r in rs):.0f}"
                f" | {median(r.writer_p50_ms for r in rs):.1f}"
                f" | {median(r.reader_stall_ms for r in rs):.0f}"
                f" | {max(r.reader_stall_ms for r in rs):.0f}"
                f" | {median(r.inserts for r in rs):.0f} | {sum(r.errors for r in rs)} |"
            )
        if of.get("online") and of.get("previous"):
            online, previous = of["online"], of["previous"]
            per_round = " / ".join(
                f"{o.wall_s / p.wall_s:.2f}" for o, p in zip(online, previous, strict=True)
            )
            ratios.append(
                f"online/previous wall time at {rows:,} rows: "
                f"{median(r.wall_s for r in online) / median(r.wall_s for r in previous):.2f}x"
                f" (medians; per round {per_round})"
            )
    return [*lines, "", *ratios]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, action="append", help="row count (repeatable; default 100k and 1M)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="runs of each variant, interleaved; the table shows medians (default 3)",
    )
    parser.add_argument(
        "--database-url", help="a server to use (superuser); default: a throwaway cluster"
    )
    parser.add_argument(
        "--variant", action="append", choices=VARIANTS, help="variants to run (default: all)"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    variants = tuple(args.variant or VARIANTS)
    counts = args.rows or [100_000, 1_000_000]

    cluster = None
    if args.database_url:
        admin_url = normalize_url(args.database_url)
    else:
        cluster = LocalPostgres.throwaway().start()
        admin_url = cluster.url()
    results: list[Result] = []
    try:
        for rows in counts:
            results += run_rows(admin_url, rows, variants, args.rounds)
    finally:
        if cluster is not None:
            cluster.destroy()
    print()
    print("\n".join(table(results, counts, variants)))


if __name__ == "__main__":
    main()
