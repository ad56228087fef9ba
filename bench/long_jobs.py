"""Long jobs on a large ledger: what heartbeats cost while thousands of jobs run for minutes.

    nice -n 10 uv run python bench/long_jobs.py [--ledger 1000000] [--running 2000] [--minutes 10]

A throwaway PostgreSQL cluster (fsync on, `--shared-buffers`, pg_stat_statements loaded) is
migrated to head and loaded by bench/ledger_scale.py's loader: `--ledger` jobs over `--days`
days, 97% succeeded, 1% each failed, dead_letter and canceled, 0.1% queued (short
`mock_process` jobs), with `--events-per-job` events each, over `--orgs` orgs of Zipf-like
sizes (at 1M jobs over 200 orgs: the largest 170,000, the smallest 1,000); then
VACUUM ANALYZE. On it `--running` + `--backlog` long jobs (`long_sleep`, bench/long_jobs_types.py:
sleeps in `--stage-seconds` stages, recording each; it outlasts the run) are submitted through
the service, over the same orgs.

Before the run the claim statement is timed (`--samples` claims of 10 jobs by a probe,
each rolled back). Then `--workers` processes of the real `heimdex worker` (their
`--concurrency` adding up to `--running`, default settings: a heartbeat renews every lease
a process holds every 5 s, in one statement; retention off, so the run's writes are the jobs'
own) claim the ledger's queued jobs and the long ones until `--running` long jobs run and the
backlog waits. Over the next `--minutes` the table reads:
- the HOT share of `job` updates (pg_stat_user_tables n_tup_hot_upd / n_tup_upd over the
  window: heartbeats and stage boundaries; every claim is before it), with the heartbeat
  statement's calls, rows and mean/max time (pg_stat_statements);
- dead tuples of `job` and `job_event`, autovacuum runs, heap and index sizes at the window's
  start and end, and the heap pages holding the running jobs;
- the connections the workers hold (pg_stat_activity, sampled every 10 s);
- the claim statement timed again, now with the workers holding their jobs: against the
  ledger as `--minutes` of heartbeats left it, on a server busy with them (the probe's wait,
  and the statement's time on the server from pg_stat_statements).
Then SIGTERM to the workers (their jobs go back to the queue) and the cluster is removed.
Run it niced: the workers hold `--running` threads, PostgreSQL a backend per connection.

`--workers 1 --running 250` is the dense case: one worker holds every job of the pages its
jobs were inserted on, so each heartbeat needs room for a second version of all of them;
`--fillfactor N` sets `job`'s fillfactor before the load, to compare with the migrations' own.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from ledger_scale import SERVER_SETTINGS, _timed, load
from sqlalchemy import Engine, text

from heimdex.db import make_engine
from heimdex.ledger import service
from heimdex.ledger.registry import load_registry
from heimdex_db.config import alembic_config
from heimdex_db.localpg import LocalPostgres

BENCH = Path(__file__).resolve().parent
JOB_MODULE = "long_jobs_types:jobs"
WORKER_APP = "heimdex-bench-worker"
MAX_CONCURRENCY = 256  # `heimdex worker --concurrency` accepts at most this
SUBMIT_BATCH = 500
HEARTBEAT_SQL = "%SET heartbeat_at = now()%"
CLAIM_SQL = "WITH ready AS%"


def _zipf_orgs(orgs: int, slots: int = 2000) -> list[uuid.UUID]:
    """`orgs` org ids, each repeated in proportion to 1 / its rank: the loader picks uniformly
    from the list, so the ledger has a few large orgs and a long tail of small ones."""
    ids = [uuid.uuid4() for _ in range(orgs)]
    harmonic = sum(1 / r for r in range(1, orgs + 1))
    return [o for r, o in enumerate(ids, 1) for _ in range(max(1, round(slots / r / harmonic)))]


@contextmanager
def _cluster(shared_buffers: str, max_connections: int) -> Iterator[LocalPostgres]:
    cluster = LocalPostgres.throwaway(durable=True).start()
    try:
        engine = make_engine(cluster.url(), isolation_level="AUTOCOMMIT")
        settings = {
            **SERVER_SETTINGS,
            "shared_buffers": shared_buffers,
            "shared_preload_libraries": "pg_stat_statements",
        }
        with engine.connect() as conn:
            for name, value in settings.items():
                conn.execute(text(f"ALTER SYSTEM SET {name} = '{value}'"))
        engine.dispose()
        cluster.stop()
        cluster.max_connections = max_connections  # a command-line setting: not ALTER SYSTEM's
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@dataclass(frozen=True)
class TableStats:
    upd: int
    hot: int
    dead: int
    live: int
    autovacuums: int


def _table_stats(conn: Any, table: str) -> TableStats:
    conn.execute(text("SELECT pg_stat_clear_snapshot()"))
    row = conn.execute(
        text(
            "SELECT n_tup_upd, n_tup_hot_upd, n_dead_tup, n_live_tup, autovacuum_count"
            " FROM pg_stat_user_tables WHERE relid = CAST(:t AS regclass)"
        ),
        {"t": table},
    ).one()
    return TableStats(*row)


def _sizes(conn: Any) -> dict[str, int]:
    """Bytes of `job` and `job_event` (heap) and of each of their indexes."""
    rows = conn.execute(
        text("""
SELECT c.relname, pg_relation_size(c.oid)
  FROM pg_class c
 WHERE c.oid IN (CAST('job' AS regclass), CAST('job_event' AS regclass))
 UNION ALL
SELECT i.relname, pg_relation_size(i.oid)
  FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
 WHERE x.indrelid IN (CAST('job' AS regclass), CAST('job_event' AS regclass))
 ORDER BY 1""")
    ).all()
    return {name: size for name, size in rows}


def _running_pages(conn: Any) -> tuple[int, int]:
    """Running jobs, and the heap pages holding them."""
    row = conn.execute(
        text(
            "SELECT count(*), count(DISTINCT (ctid::text::point)[0])"
            " FROM job WHERE status = 'running'"
        )
    ).one()
    return int(row[0]), int(row[1])


def _statement(conn: Any, pattern: str) -> tuple[int, int, float, float]:
    """calls, rows, mean and max ms of the statements like `pattern` (pg_stat_statements)."""
    row = conn.execute(
        text(
            "SELECT coalesce(sum(calls), 0), coalesce(sum(rows), 0),"
            " coalesce(sum(total_exec_time) / nullif(sum(calls), 0), 0),"
            " coalesce(max(max_exec_time), 0)"
            " FROM pg_stat_statements WHERE query LIKE :p"
        ),
        {"p": pattern},
    ).one()
    return int(row[0]), int(row[1]), float(row[2]), float(row[3])


def _connections(conn: Any) -> tuple[int, int]:
    """Connections of the workers, and how many of them are running a statement."""
    row = conn.execute(
        text(
            "SELECT count(*), count(*) FILTER (WHERE state = 'active')"
            " FROM pg_stat_activity WHERE application_name = :app"
        ),
        {"app": WORKER_APP},
    ).one()
    return int(row[0]), int(row[1])


def _submit(engine: Engine, orgs: list[uuid.UUID], n: int, *, seconds: float, stage: float) -> None:
    """`n` long jobs through the service, each for an org drawn from the ledger's spread."""
    registry = load_registry([JOB_MODULE])
    by_org: dict[uuid.UUID, int] = {}
    for org in random.choices(orgs, k=n):
        by_org[org] = by_org.get(org, 0) + 1
    spec = service.JobSpec("long_sleep", {"seconds": seconds, "stage_seconds": stage})
    with engine.begin() as conn:
        for org, count in by_org.items():
            for i in range(0, count, SUBMIT_BATCH):
                service.submit_jobs(
                    conn, registry, org_id=org, specs=[spec] * min(SUBMIT_BATCH, count - i)
                )


def _claim_probe(engine: Engine, samples: int) -> tuple[float, float, float, float]:
    """p50 and p99 ms of the claim as the probe waits for it, and its mean and max ms on the
    server (pg_stat_statements: what the machine's load adds is the difference)."""

    def claim(_: int) -> None:
        with engine.connect() as conn:
            claimed = service.claim(conn, worker_id="bench-probe", limit=10, lease_seconds=30)
            conn.rollback()
        if not claimed.jobs:
            raise SystemExit("the claim probe found nothing queued: raise --backlog")

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("SELECT pg_stat_statements_reset()"))
        p50, p99 = _timed(samples, claim)
        _, _, mean, top = _statement(conn, CLAIM_SQL)
    return p50, p99, mean, top


def _start_workers(
    url: str, concurrencies: list[int], logdir: Path
) -> list[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "DATABASE_URL": f"{url}?application_name={WORKER_APP}",
        "HEIMDEX_JOB_MODULES": JOB_MODULE,
        "PYTHONPATH": os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH")) if p),
        "HEIMDEX_LOG_LEVEL": "warning",
        "HEIMDEX_RETENTION_SUCCEEDED": "off",
        "HEIMDEX_RETENTION_FAILED": "off",
        "HEIMDEX_SHUTDOWN_GRACE_SECONDS": "15",
    }
    procs = []
    for i, concurrency in enumerate(concurrencies):
        log = (logdir / f"worker-{i}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "heimdex",
                    "worker",
                    "--concurrency",
                    str(concurrency),
                    "--batch",
                    str(concurrency),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def _check_workers(procs: list[subprocess.Popen[bytes]], logdir: Path) -> None:
    for i, proc in enumerate(procs):
        if proc.poll() is not None:
            tail = (logdir / f"worker-{i}.log").read_text(errors="replace")[-2000:]
            raise SystemExit(f"worker {i} exited with {proc.returncode}:\n{tail}")


def _stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f}"


def run(args: argparse.Namespace) -> list[tuple[str, str, str]]:  # noqa: PLR0915 - one scenario, start to end
    workers = args.workers or math.ceil(args.running / MAX_CONCURRENCY)
    if args.running > workers * MAX_CONCURRENCY:
        raise SystemExit(
            f"--running {args.running} needs --workers >= "
            f"{math.ceil(args.running / MAX_CONCURRENCY)} (256 threads each)"
        )
    concurrencies = [args.running // workers + (i < args.running % workers) for i in range(workers)]
    # Today a worker keeps a connection per runner thread, plus a few of its own.
    max_connections = args.running + 20 * workers + 50
    rows: list[tuple[str, str, str]] = []
    logdir = Path(tempfile.mkdtemp(prefix="heimdex-long-jobs-"))
    with _cluster(args.shared_buffers, max_connections) as cluster:
        url = cluster.url().render_as_string(hide_password=False)
        command.upgrade(alembic_config(database_url=cluster.url()), "head")
        engine = make_engine(url, pool_size=2)
        if args.fillfactor:
            with engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE job SET (fillfactor = {int(args.fillfactor)})"))
        orgs = _zipf_orgs(args.orgs)
        print(f"loading {args.ledger:,} jobs over {args.orgs} orgs ...", flush=True)
        load(engine, args.ledger, orgs=orgs, days=args.days, events=args.events_per_job)
        seconds = args.minutes * 60 + 3600  # outlasts the run: no job ends inside the window
        _submit(
            engine, orgs, args.running + args.backlog, seconds=seconds, stage=args.stage_seconds
        )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE job"))
            conn.execute(text("CREATE EXTENSION pg_stat_statements"))
        print(
            f"submitted {args.running + args.backlog:,} long jobs; timing the claim ...", flush=True
        )
        claim_before = _claim_probe(engine, args.samples)

        with engine.connect() as conn:
            filling = _table_stats(conn, "job")
            options = conn.execute(
                text(
                    "SELECT coalesce(array_to_string(reloptions, ', '), 'default (fillfactor=100)')"
                    " FROM pg_class WHERE oid = CAST('job' AS regclass)"
                )
            ).scalar_one()
        procs = _start_workers(url, concurrencies, logdir)
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("SELECT pg_stat_statements_reset()"))
                print(
                    f"{workers} workers ({'+'.join(map(str, concurrencies))} threads) claiming ...",
                    flush=True,
                )
                started = time.monotonic()
                while True:
                    _check_workers(procs, logdir)
                    running = conn.execute(
                        text(
                            "SELECT count(*) FROM job WHERE status = 'running'"
                            " AND type = 'long_sleep'"
                        )
                    ).scalar_one()
                    if running >= args.running:
                        break
                    if time.monotonic() - started > args.fill_timeout:
                        raise SystemExit(
                            f"{running} of {args.running} long jobs running after"
                            f" {args.fill_timeout:.0f}s (connections held:"
                            f" {_connections(conn)[0]}); see {logdir}"
                        )
                    time.sleep(1)
                fill = time.monotonic() - started
                print(f"  {running:,} running after {fill:.0f}s", flush=True)
                # The claims' last heartbeats and stats land before the window opens.
                time.sleep(12)
                claims = _statement(conn, CLAIM_SQL)
                conn.execute(text("SELECT pg_stat_statements_reset()"))
                job0, event0 = _table_stats(conn, "job"), _table_stats(conn, "job_event")
                sizes0 = _sizes(conn)
                pages0 = _running_pages(conn)
                window = args.minutes * 60
                opened = time.monotonic()
                samples: list[tuple[int, int]] = []
                print(f"  window open for {args.minutes:g} min ...", flush=True)
                while (left := opened + window - time.monotonic()) > 0:
                    _check_workers(procs, logdir)
                    samples.append(_connections(conn))
                    time.sleep(min(10.0, left))
                job1, event1 = _table_stats(conn, "job"), _table_stats(conn, "job_event")
                sizes1 = _sizes(conn)
                pages1 = _running_pages(conn)
                beats = _statement(conn, HEARTBEAT_SQL)
                stages = _statement(conn, "%SET stage = %")
            print("  window closed; timing the claim ...", flush=True)
            claim_after = _claim_probe(engine, args.samples)
            _check_workers(procs, logdir)
        finally:
            _stop_workers(procs)
        engine.dispose()
    shutil.rmtree(logdir)  # kept when the run fails: the workers' logs say why

    upd, hot = job1.upd - job0.upd, job1.hot - job0.hot
    rows += [
        ("ledger", f"{args.ledger:,} jobs, {args.orgs} orgs", ""),
        (
            "long jobs running / queued behind them",
            f"{args.running:,} / {args.backlog:,}",
            f"filled in {fill:.0f}s",
        ),
        ("workers (threads each)", f"{workers} ({'+'.join(map(str, concurrencies))})", ""),
        ("`job` storage parameters", options, ""),
        ("window", f"{args.minutes:g} min", ""),
        ("**HOT share of `job` updates**", f"**{hot / max(upd, 1):.1%}**", f"{hot:,} of {upd:,}"),
        (
            "HOT share while filling (claims included)",
            f"{(job0.hot - filling.hot) / max(job0.upd - filling.upd, 1):.1%}",
            f"{job0.hot - filling.hot:,} of {job0.upd - filling.upd:,}",
        ),
        (
            "heartbeat statements: calls, rows, mean / max ms",
            f"{beats[0]:,}, {beats[1]:,}",
            f"{beats[2]:.2f} / {beats[3]:.2f}",
        ),
        (
            "stage boundaries recorded: calls, mean / max ms",
            f"{stages[0]:,}",
            f"{stages[2]:.2f} / {stages[3]:.2f}",
        ),
        (
            "workers' claims while filling: calls, mean / max ms",
            f"{claims[0]:,}",
            f"{claims[2]:.2f} / {claims[3]:.2f}",
        ),
        (
            "connections held by the workers: min / max",
            f"{min(s[0] for s in samples):,} / {max(s[0] for s in samples):,}",
            f"active at most {max(s[1] for s in samples)}",
        ),
    ]
    rows.append(("measure", "window start", "window end"))
    rows += [
        ("`job` dead tuples", f"{job0.dead:,}", f"{job1.dead:,}"),
        ("`job_event` dead tuples", f"{event0.dead:,}", f"{event1.dead:,}"),
        (
            "autovacuum runs on `job` / `job_event` (total)",
            f"{job0.autovacuums} / {event0.autovacuums}",
            f"{job1.autovacuums} / {event1.autovacuums}",
        ),
        (
            "running jobs / heap pages holding them",
            f"{pages0[0]:,} / {pages0[1]:,}",
            f"{pages1[0]:,} / {pages1[1]:,}",
        ),
        (
            "claim 10 (rolled back), p50 / p99 ms",
            f"{claim_before[0]:.2f} / {claim_before[1]:.2f} (before the workers)",
            f"{claim_after[0]:.2f} / {claim_after[1]:.2f}",
        ),
        (
            "the same on the server, mean / max ms",
            f"{claim_before[2]:.2f} / {claim_before[3]:.2f}",
            f"{claim_after[2]:.2f} / {claim_after[3]:.2f}",
        ),
    ]
    rows += [(f"`{name}`, MiB", _mib(sizes0[name]), _mib(sizes1[name])) for name in sorted(sizes0)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ledger", type=int, default=1_000_000, help="jobs loaded first")
    parser.add_argument("--running", type=int, default=2000, help="long jobs held running")
    parser.add_argument("--backlog", type=int, default=500, help="long jobs queued behind them")
    parser.add_argument("--minutes", type=float, default=10.0, help="the measured window")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="worker processes (default: --running / 256, rounded up)",
    )
    parser.add_argument(
        "--stage-seconds", type=float, default=60.0, help="a long job records a stage this often"
    )
    parser.add_argument(
        "--fillfactor",
        type=int,
        default=0,
        help="set on `job` before the load (to compare; default: the migrations' own)",
    )
    parser.add_argument("--orgs", type=int, default=200)
    parser.add_argument("--days", type=int, default=30, help="the loaded history's span")
    parser.add_argument("--events-per-job", type=int, default=5)
    parser.add_argument("--samples", type=int, default=300, help="claims timed before and after")
    parser.add_argument("--shared-buffers", default="2GB")
    parser.add_argument(
        "--fill-timeout",
        type=float,
        default=600.0,
        help="seconds the workers get to start --running jobs",
    )
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl-C: the workers are stopped and the cluster removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = run(args)
    print()
    print("| measure | | |")
    print("|---|---|---|")
    for measure, a, b in rows:
        print(f"| {measure} | {a} | {b} |")


if __name__ == "__main__":
    main()
