"""Placing jobs that come due later: claim latency and drain rate with many orgs.

    uv run python bench/placement.py [--orgs 10000] [--jobs 100000] [--rounds 3]
    uv run python bench/placement.py --baseline ../wt-base    # side by side with a checkout

One throwaway PostgreSQL 15 cluster with fsync on and `pg_stat_statements` loaded. For each
measurement a fresh database is migrated to head by the measured checkout and loaded in SQL
with `--jobs` queued jobs over `--orgs` orgs that came due unplaced (`turn` NULL, `run_at`
spread over the last `--spread` seconds), as retries, requeues and scheduled jobs leave them
(`--placed`: the reference, the same jobs placed round-robin as submits place them, so every
claim is an ordinary one); then ANALYZEd: the statistics say nothing is placed yet, as
autovacuum's would when a backlog comes due. A child process (the checkout's own interpreter)
runs the production worker (`run_worker`, `--concurrency` runners claiming `--batch` jobs,
no-op jobs) until nothing is queued or running, or `--timeout` seconds.

Measured, in the child: the wall time of each claim as a runner waits for it (`Worker._claim`:
the statement, its round trip and the worker's Python around it) and, where the checkout has a
placing step apart from the claim, of each placing step that placed jobs (`Worker._place`);
jobs/s from the worker's start until the last job is done. On the server: with
`pg_stat_statements`, the mean and the longest execution of the claim statement and of the
placing statement; the claims that ran longer than 10 ms (`log_min_duration_statement`: the
statement alone, without the client's scheduling); PostgreSQL's CPU per job (its backends',
from /proc). `--baseline TREE` runs a checkout with its own `.venv` (e.g. `git worktree add
--detach ../wt-base main && (cd ../wt-base && uv sync)`) as "baseline" in the same rounds,
interleaved (current, baseline, current, ...); the table shows medians over the rounds. The
machine's load average is printed before and after: on shared cores, latencies follow it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
SECRET = "bench-secret-0123456789-0123456789-0123"  # noqa: S105 - a throwaway cluster's token
SLOW_MS = 10  # the server logs statements that run longer; the table counts the claims

LOAD = """
INSERT INTO job (org_id, type, params, attempt, run_at, created_at, turn)
SELECT o.org, 'noop', '{}'::jsonb, 1,
       now() - make_interval(secs => (%(jobs)s - g) * %(spread)s / %(jobs)s),
       now() - interval '1 hour', CASE WHEN %(placed)s THEN g / %(n)s END
  FROM generate_series(0, %(jobs)s - 1) AS g
 CROSS JOIN LATERAL (SELECT (CAST(%(orgs)s AS uuid[]))[1 + (hashint4(g) & 2147483647) %% %(n)s]
                            AS org) AS o
"""

# pg_stat_statements: the claim takes leases, the placing step gives turns by the org probe.
CLAIM_STATEMENT = "query LIKE '%lease_token = gen_random_uuid()%'"
PLACE_STATEMENT = "query LIKE '%job_last_turn%' AND query NOT LIKE '%lease_token%'"


# The child: one drain with the measured checkout's worker, printed as JSON on its last line.


def _summary(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ordered = sorted(seconds)
    return {
        "count": len(ordered),
        "p50": ordered[len(ordered) // 2] * 1000,
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "max": ordered[-1] * 1000,
    }


def child(url: str, concurrency: int, batch: int, timeout: float) -> dict[str, Any]:
    import psycopg  # noqa: PLC0415

    from heimdex.settings import Settings  # noqa: PLC0415
    from heimdex_worker import main  # noqa: PLC0415

    waits: dict[str, list[float]] = {"claim": [], "place": []}

    def timed(name: str, method: Any) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            value = method(self, *args, **kwargs)
            # A placing step counts when it placed jobs (a runner that finds another placer
            # at work returns at once, having done nothing).
            if name == "claim" or value:
                waits[name].append(time.perf_counter() - started)
            return value

        return wrapper

    worker_class: Any = main.Worker
    worker_class._claim = timed("claim", worker_class._claim)
    if hasattr(worker_class, "_place"):
        worker_class._place = timed("place", worker_class._place)

    settings = Settings.model_validate(
        {"DATABASE_URL": url, "HEIMDEX_JWT_SECRET": SECRET, "HEIMDEX_LOG_LEVEL": "warning"}
    )
    stop = threading.Event()
    started = time.perf_counter()
    thread = threading.Thread(
        target=main.run_worker,
        args=(settings, stop),
        kwargs={"concurrency": concurrency, "batch": batch},
    )
    thread.start()
    # Probes of two partial-index ranges (no sequential scan through the drained jobs).
    unfinished = (
        "SELECT EXISTS (SELECT FROM job WHERE status = 'queued')"
        " OR EXISTS (SELECT FROM job WHERE status = 'running')"
    )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")
        deadline = started + timeout
        while conn.execute(unfinished, prepare=True).fetchone() == (True,):
            if time.perf_counter() > deadline:
                break
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        stop.set()
        thread.join()
        row = conn.execute("SELECT count(*) FROM job WHERE status = 'succeeded'").fetchone()
        done = int(row[0]) if row else 0
    return {
        "done": done,
        "rate": done / elapsed,
        "claim": _summary(waits["claim"]),
        "place": _summary(waits["place"]),
    }


# The parent: one cluster, a fresh database per measurement, interleaved rounds, the table.


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Cluster:
    def __init__(self) -> None:
        import psycopg  # noqa: PLC0415

        from heimdex_db.localpg import LocalPostgres  # noqa: PLC0415

        self.pg = LocalPostgres.throwaway(durable=True).start()
        admin = self.pg.url().set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            conn.execute(f"ALTER SYSTEM SET log_min_duration_statement = '{SLOW_MS}ms'")
        self.pg.stop()
        self.pg.start()
        self._n = 0

    def fresh_database(self, python: Path, tree: Path) -> str:
        """A new database migrated to head by the checkout `tree` (its own interpreter)."""
        self._n += 1
        url = self.pg.create_database(f"placement_{self._n}")
        upgrade = (
            "import sys\nfrom alembic import command\n"
            "from heimdex_db.config import alembic_config\n"
            "command.upgrade(alembic_config(database_url=sys.argv[1]), 'head')"
        )
        subprocess.run(
            [str(python), "-c", upgrade, url.render_as_string(hide_password=False)],
            check=True,
            cwd=tree,
            capture_output=True,
        )
        return url.set(drivername="postgresql").render_as_string(hide_password=False)

    @property
    def log(self) -> Path:
        return self.pg.socket_dir / "postgres.log"

    def slow_statements(self, offset: int) -> dict[str, int]:
        """Claims and placing steps that ran longer than SLOW_MS on the server, from the log
        written since `offset` (`log_min_duration_statement`)."""
        with self.log.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        records = re.split(r"(?m)^(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text)
        slow = {"claim": 0, "place": 0}
        for record in records:
            if "duration:" not in record:
                continue
            if "lease_token = gen_random_uuid()" in record:
                slow["claim"] += 1
            elif "job_last_turn" in record:
                slow["place"] += 1
        return slow

    def server_cpu(self) -> float:
        """CPU seconds of the cluster's exited processes (each measurement's backends exit with
        its child) plus the postmaster's own, from /proc."""
        pid = int((self.pg.datadir / "postmaster.pid").read_text().split()[0])
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    def destroy(self) -> None:
        self.pg.destroy()


@dataclass
class Measured:
    rate: float
    done: int
    claim: dict[str, float]
    place: dict[str, float]
    server: dict[str, float]
    cpu_per_job: float


def _load(url: str, orgs: int, jobs: int, spread: float, placed: bool) -> None:
    import uuid  # noqa: PLC0415

    import psycopg  # noqa: PLC0415

    ids = [uuid.uuid4() for _ in range(orgs)]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        params = {"orgs": ids, "n": orgs, "jobs": jobs, "spread": spread, "placed": placed}
        conn.execute(LOAD, params)
        conn.execute("ANALYZE")
        conn.execute("SELECT pg_stat_statements_reset()")


def _server(url: str) -> dict[str, float]:
    import psycopg  # noqa: PLC0415

    out: dict[str, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for name, where in (("claim", CLAIM_STATEMENT), ("place", PLACE_STATEMENT)):
            row = conn.execute(
                "SELECT sum(calls), sum(total_exec_time) / nullif(sum(calls), 0),"
                " max(max_exec_time) FROM pg_stat_statements"
                f" WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                f" AND {where}"
            ).fetchone()
            if row and row[0]:
                out[f"{name}_calls"] = float(row[0])
                out[f"{name}_mean"] = float(row[1])
                out[f"{name}_max"] = float(row[2])
    return out


def measure(cluster: Cluster, tree: Path, args: argparse.Namespace, label: str) -> Measured | None:
    python = tree / ".venv" / "bin" / "python"
    url = cluster.fresh_database(python, tree)
    _load(url, args.orgs, args.jobs, args.spread, args.placed)
    before = cluster.server_cpu()
    offset = cluster.log.stat().st_size
    proc = subprocess.run(
        [str(python), str(HERE), "--child", url, str(args.concurrency), str(args.batch),
         str(args.timeout)],
        capture_output=True, text=True, check=False, cwd=tree,
    )  # fmt: skip
    if proc.returncode != 0:
        _progress(f"  {label}: FAILED: {proc.stderr.strip().splitlines()[-3:]}")
        return None
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    cpu = (cluster.server_cpu() - before) / max(out["done"], 1)
    server = _server(url)
    slow = cluster.slow_statements(offset)
    server["claim_slow"] = float(slow["claim"])
    server["place_slow"] = float(slow["place"])
    result = Measured(out["rate"], out["done"], out["claim"], out["place"], server, cpu)
    place = (
        f", placing p50 {result.place['p50']:.1f} p99 {result.place['p99']:.1f} ms"
        if result.place
        else ""
    )
    _progress(
        f"  {label:>8}: {result.done} jobs, {result.rate:6.0f} jobs/s, claim p50"
        f" {result.claim['p50']:.1f} p99 {result.claim['p99']:.1f} max"
        f" {result.claim['max']:.0f} ms{place}; on the server {slow['claim']} of"
        f" {server.get('claim_calls', 0):.0f} claims over {SLOW_MS} ms;"
        f" load {os.getloadavg()[0]:.1f}"
    )
    return result


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(args: argparse.Namespace, results: dict[str, list[Measured]]) -> None:
    how = "placed at submit" if args.placed else "come due unplaced"
    print(
        f"\n{args.jobs} jobs {how} over {args.orgs} orgs, drained by one worker "
        f"(concurrency {args.concurrency}, batch {args.batch}); PostgreSQL 15, fsync on; "
        f"{args.rounds} interleaved rounds, medians. Claim and placing: wall ms as a runner "
        "waits for them (client), and the statement's mean and longest execution (server)\n"
    )
    head = (
        "| code | jobs/s | claims | claim p50 | claim p99 | claim max | placing steps "
        "| placing p50 | placing p99 | placing max | server claim mean / max "
        f"| server claims > {SLOW_MS} ms | server placing mean / max | PostgreSQL CPU/job |"
    )
    print(head)
    print("|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|")
    for label, runs in results.items():
        if not runs:
            print(f"| {label} | failed |")
            continue

        def med(get: Any, runs: list[Measured] = runs) -> float | None:
            return _median([v for r in runs if (v := get(r)) is not None])

        def part(name: str, key: str) -> Any:
            return lambda r: getattr(r, name).get(key)

        server_claim = f"{_ms(med(lambda r: r.server.get('claim_mean')), 2)} / " + _ms(
            med(lambda r: r.server.get("claim_max")), 0
        )
        server_place = f"{_ms(med(lambda r: r.server.get('place_mean')), 2)} / " + _ms(
            med(lambda r: r.server.get("place_max")), 0
        )
        if med(lambda r: r.server.get("place_mean")) is None:
            server_place = "-"
        slow = med(lambda r: r.server.get("claim_slow"))
        calls = med(lambda r: r.server.get("claim_calls"))
        slow_claims = (
            f"{slow:.0f} ({100 * slow / calls:.1f}%)" if slow is not None and calls else "-"
        )
        print(
            f"| {label} | {_ms(med(lambda r: r.rate), 0)} | {_ms(med(part('claim', 'count')), 0)}"
            f" | {_ms(med(part('claim', 'p50')))} | {_ms(med(part('claim', 'p99')))}"
            f" | {_ms(med(part('claim', 'max')), 0)} | {_ms(med(part('place', 'count')), 0)}"
            f" | {_ms(med(part('place', 'p50')))} | {_ms(med(part('place', 'p99')))}"
            f" | {_ms(med(part('place', 'max')), 0)} | {server_claim} | {slow_claims}"
            f" | {server_place}"
            f" | {_ms(med(lambda r: r.cpu_per_job * 1e6), 0)} us |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orgs", type=int, default=10_000, help="orgs the jobs are spread over")
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs that come due unplaced")
    parser.add_argument(
        "--spread", type=float, default=60.0, help="their run_at: over the last N seconds"
    )
    parser.add_argument(
        "--placed",
        action="store_true",
        help="the reference: the same jobs placed as submits place them (ordinary claims)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--concurrency", type=int, default=4, help="the worker's runners")
    parser.add_argument("--batch", type=int, default=10, help="jobs per claim")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds a drain may take before it stops"
    )
    parser.add_argument(
        "--baseline",
        metavar="TREE",
        help="also run this checkout (with its own .venv) as 'baseline', interleaved",
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, concurrency, batch, timeout = args.child
        print(json.dumps(child(url, int(concurrency), int(batch), float(timeout))))
        return
    if args.orgs < 1 or args.jobs < 1:
        parser.error("--orgs and --jobs must be positive")
    trees = {"current": HERE.parent.parent}
    if args.baseline:
        baseline = Path(args.baseline).resolve()
        if not (baseline / ".venv" / "bin" / "python").exists():
            parser.error(f"--baseline {baseline}: no .venv there (run `uv sync` in it first)")
        trees["baseline"] = baseline

    # Stopped by SIGTERM, the run still removes its cluster (the `finally` below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    _progress(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    cluster = Cluster()
    results: dict[str, list[Measured]] = {label: [] for label in trees}
    try:
        for round_ in range(1, args.rounds + 1):
            _progress(f"round {round_}/{args.rounds}")
            for label, tree in trees.items():
                result = measure(cluster, tree, args, label)
                if result is not None:
                    results[label].append(result)
    finally:
        cluster.destroy()
    print_table(args, results)
    print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (2 cores)")


if __name__ == "__main__":
    main()
