"""Queue throughput, side by side: Heimdex, PGQueuer and Procrastinate on one PostgreSQL.

    uv run --group bench python bench/ledger_throughput.py [--jobs 5000] [--rounds 3]

One throwaway PostgreSQL 15 cluster with fsync on (what production runs), one database per
system. Every measurement runs in a fresh child process, in rounds interleaved across the
systems (H, P, Q, Q, P, H, H, P, Q, ...: every other round in reverse), so a noisy neighbour
hits them alike; the table shows medians and each system's ratio to Heimdex.

- processing: N no-op jobs (over `--orgs` orgs for Heimdex) enqueued in bulk by a child of their
  own (not timed) and ANALYZEd, then one consumer with concurrency 4 drains them; jobs/s from
  the consumer's start until the last job is done, and CPU per job: the consumer process's (from
  its start) and PostgreSQL's backends' (from /proc, the postmaster's reaped children). Heimdex
  runs its production worker (claim, runner threads, batched outcomes, the full event log:
  submitted, claimed, succeeded per job); PGQueuer runs `concurrency` queue managers (its own
  benchmark's `dequeue` tasks) with the same batch size; Procrastinate (no batch fetch)
  `concurrency` 4.
- raw SQL ceiling: the least a worker could do on Heimdex's schema with the full event log:
  4 connections, each `UPDATE ... FOR UPDATE SKIP LOCKED` (+ claimed events) then the outcome
  (+ events), per batch, in the claim index's order (priority, turn, due time: the turns the
  submit placed), no placing of unplaced jobs, no clock, no Python work per job.
- submit: one job per request through the real HTTP API (`heimdex api --workers 2`, loaded by
  `wrk` with 4 keep-alive connections when it is installed, else 4 Python client threads)
  against PGQueuer's `enqueue` one by one (4 tasks, straight to the database, no HTTP); bulk:
  `POST /jobs/batch` with 1,000 jobs per request against PGQueuer's `enqueue` of 1,000.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
CONCURRENCY = 4
SECRET = "bench-secret-0123456789-0123456789-0123"  # noqa: S105 - a throwaway cluster's token


# Children: one measurement each, printed as JSON on the last line of stdout.

_cpu_started = 0.0


def _start() -> float:
    """The measured window opens: wall clock now, and this process's CPU counted from here."""
    global _cpu_started  # noqa: PLW0603 - one measurement per child process
    _cpu_started = time.process_time()
    return time.perf_counter()


def _heimdex_enqueue(url: str, n: int) -> None:
    from heimdex.db import make_engine  # noqa: PLC0415
    from heimdex.ledger import service  # noqa: PLC0415
    from heimdex.ledger.registry import load_registry  # noqa: PLC0415

    engine = make_engine(url)
    registry = load_registry()
    orgs = [uuid.uuid4() for _ in range(int(os.environ.get("BENCH_ORGS", "10")))]
    with engine.begin() as conn:
        _heimdex_limits(conn, orgs)
        for i in range(0, n, 1000):
            specs = [service.JobSpec("noop", {})] * min(1000, n - i)
            service.submit_jobs(conn, registry, org_id=orgs[i // 1000 % len(orgs)], specs=specs)
    engine.dispose()


def _heimdex_limits(conn: Any, orgs: list[uuid.UUID]) -> None:
    """`--caps N`: each org capped at N running (not binding when N is above the worker's
    concurrency, yet every job goes through the placer and every slot is counted);
    `--weights`: the orgs weighted 1, 2, 3, 1, 2, 3, ..."""
    cap = int(os.environ.get("BENCH_CAP", "0"))
    weights = os.environ.get("BENCH_WEIGHTS") == "1"
    if not cap and not weights:
        return
    from heimdex.ledger import control  # noqa: PLC0415

    who = control.Who("bench", "bench")
    for i, org in enumerate(orgs):
        control.set_limit(
            conn, who, org_id=org, max_running=cap or None, weight=(i % 3) + 1 if weights else None
        )


def child_heimdex(url: str, n: int, batch: int) -> float:
    import psycopg  # noqa: PLC0415

    from heimdex.settings import Settings  # noqa: PLC0415
    from heimdex_worker.main import run_worker  # noqa: PLC0415

    settings = Settings.model_validate({"DATABASE_URL": url, "HEIMDEX_JWT_SECRET": SECRET})
    stop = threading.Event()
    started = _start()
    worker = threading.Thread(
        target=run_worker,
        args=(settings, stop),
        kwargs={"concurrency": CONCURRENCY, "batch": batch, **_heimdex_queues()},
    )
    worker.start()
    # Done when nothing is queued or running: two probes of indexes, however many jobs have
    # finished (a count of the finished would scan them, 50 times a second). With the queue's
    # statistics current, the planner answers each EXISTS with a sequential scan from the
    # table's start instead, through every job drained so far: 5 % of PostgreSQL's CPU in a
    # 100k-job drain, charged to Heimdex. Hence no sequential scans on this connection.
    unfinished = (
        "SELECT EXISTS (SELECT FROM job WHERE status = 'queued')"
        " OR EXISTS (SELECT FROM job WHERE status = 'running')"
    )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")
        while _scalar(conn, unfinished):
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        stop.set()
        worker.join()
        done = _scalar(conn, "SELECT count(*) FROM job WHERE status = 'succeeded'")
    if done != n:
        raise SystemExit(f"{done} of {n} jobs succeeded")
    return n / elapsed


def _heimdex_queues() -> dict[str, Any]:
    """`--queues Q,...`: the worker claims these queues (the jobs are in `default`)."""
    raw = os.environ.get("BENCH_QUEUES", "")
    return {"queues": raw.split(",")} if raw else {}


def _scalar(conn: Any, sql: str) -> Any:
    row = conn.execute(sql, prepare=True).fetchone()
    return row[0] if row else None


def child_pgqueuer(url: str, n: int, batch: int) -> float:
    import asyncpg  # noqa: PLC0415
    from pgqueuer import PgQueuer  # noqa: PLC0415
    from pgqueuer.db import AsyncpgDriver  # noqa: PLC0415
    from pgqueuer.models import Job  # noqa: PLC0415
    from pgqueuer.types import QueueExecutionMode  # noqa: PLC0415

    async def main() -> float:
        managers = [PgQueuer(AsyncpgDriver(await asyncpg.connect(url))) for _ in range(CONCURRENCY)]
        for pgq in managers:

            @pgq.entrypoint("noop")
            async def noop(job: Job) -> None:
                return None

        started = _start()
        await asyncio.gather(
            *(pgq.run(batch_size=batch, mode=QueueExecutionMode.drain) for pgq in managers)
        )
        return n / (time.perf_counter() - started)

    return asyncio.run(main())


def _pgqueuer_enqueue(url: str, n: int) -> None:
    import asyncpg  # noqa: PLC0415
    from pgqueuer.db import AsyncpgDriver  # noqa: PLC0415
    from pgqueuer.queries import Queries  # noqa: PLC0415

    async def main() -> None:
        queries = Queries(AsyncpgDriver(await asyncpg.connect(url)))
        await queries.clear_queue()
        await queries.enqueue(["noop"] * n, [None] * n, [0] * n)

    asyncio.run(main())


def _procrastinate_app(url: str) -> tuple[Any, Any]:
    import procrastinate  # noqa: PLC0415

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    return app, noop


def _procrastinate_enqueue(url: str, n: int) -> None:
    app, noop = _procrastinate_app(url)

    async def main() -> None:
        async with app.open_async():
            for i in range(0, n, 1000):
                await noop.batch_defer_async(*[{}] * min(1000, n - i))

    asyncio.run(main())


def child_procrastinate(url: str, n: int, batch: int) -> float:
    app, _ = _procrastinate_app(url)

    async def main() -> float:
        async with app.open_async():
            started = _start()
            await app.run_worker_async(
                concurrency=CONCURRENCY, wait=False, install_signal_handlers=False
            )
            return n / (time.perf_counter() - started)

    return asyncio.run(main())


RAW_CLAIM = """
WITH picked AS (
    SELECT id FROM job WHERE status = 'queued' AND turn IS NOT NULL AND run_at <= now()
     ORDER BY priority DESC, turn, run_at LIMIT %(n)s FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE job AS j SET status = 'running', started_at = now(), updated_at = now(),
           lease_token = gen_random_uuid(), leased_by = 'raw',
           lease_expires_at = now() + interval '30 seconds'
      FROM picked WHERE j.id = picked.id RETURNING j.id, j.lease_token
), ev AS (
    INSERT INTO job_event (job_id, prev_status, next_status, detail_json)
    SELECT id, 'queued', 'running', '{"action": "claimed"}' FROM claimed
)
SELECT id, lease_token FROM claimed"""
RAW_DONE = """
WITH done AS (
    UPDATE job SET status = 'succeeded', finished_at = now(), updated_at = now(),
           lease_token = NULL, result = '{}'
     WHERE id = ANY(%(ids)s) AND lease_token = ANY(%(tokens)s) RETURNING id
)
INSERT INTO job_event (job_id, prev_status, next_status, detail_json)
SELECT id, 'running', 'succeeded', '{"action": "succeeded"}' FROM done"""


def child_raw(url: str, n: int, batch: int) -> float:
    import psycopg  # noqa: PLC0415

    def loop() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while rows := conn.execute(RAW_CLAIM, {"n": batch}).fetchall():
                conn.execute(
                    RAW_DONE, {"ids": [r[0] for r in rows], "tokens": [r[1] for r in rows]}
                )

    threads = [threading.Thread(target=loop) for _ in range(CONCURRENCY)]
    started = _start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return n / (time.perf_counter() - started)


def _serve_api(url: str) -> tuple[subprocess.Popen[bytes], int, dict[str, str]]:
    from heimdex_api.auth import issue_token  # noqa: PLC0415
    from heimdex_db.localpg import free_port  # noqa: PLC0415

    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "HEIMDEX_JWT_SECRET": SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "heimdex", "api",
         "--port", str(port), "--workers", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                break
        except OSError:
            time.sleep(0.1)
        finally:
            conn.close()
    else:
        proc.kill()
        raise SystemExit("the API did not become ready within 30 s")
    token = issue_token(SECRET, org_id=uuid.uuid4())
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    return proc, port, headers


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"type": "noop"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "%s"
"""


def _wrk(port: int, headers: dict[str, str], seconds: int) -> float:
    """Requests/s of `wrk` (C, 4 keep-alive connections) posting one job per request."""
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(WRK_SCRIPT % headers["Authorization"])
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", str(CONCURRENCY), "-d", f"{seconds}s", "-s", str(script),
         f"http://127.0.0.1:{port}/jobs"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    if "Non-2xx" in out:
        raise SystemExit(f"wrk saw failed submissions:\n{out}")
    return float(out.split("Requests/sec:")[1].split()[0])


def child_submit_heimdex(url: str, n: int, batch: int) -> float:
    proc, port, headers = _serve_api(url)
    try:
        if batch == 1 and shutil.which("wrk"):
            return _wrk(port, headers, seconds=max(3, n // 1000))
        if batch == 1:
            body = json.dumps({"type": "noop"})
            path, per_request = "/jobs", 1
        else:
            body = json.dumps({"jobs": [{"type": "noop"}] * batch})
            path, per_request = "/jobs/batch", batch
        requests = n // per_request
        failures: list[int] = []

        def client(count: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            for _ in range(count):
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 201:
                    failures.append(resp.status)
            conn.close()

        clients = CONCURRENCY if batch == 1 else 1
        threads = [
            threading.Thread(target=client, args=(requests // clients,)) for _ in range(clients)
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        if failures:
            raise SystemExit(f"{len(failures)} submissions failed: {sorted(set(failures))}")
        return requests // clients * clients * per_request / elapsed
    finally:
        proc.terminate()
        proc.wait()


def child_submit_pgqueuer(url: str, n: int, batch: int) -> float:
    import asyncpg  # noqa: PLC0415
    from pgqueuer.db import AsyncpgDriver  # noqa: PLC0415
    from pgqueuer.queries import Queries  # noqa: PLC0415

    async def main() -> float:
        if batch == 1:
            clients = [
                Queries(AsyncpgDriver(await asyncpg.connect(url))) for _ in range(CONCURRENCY)
            ]

            async def one(queries: Queries) -> None:
                for _ in range(n // CONCURRENCY):
                    await queries.enqueue("noop", None)

            started = time.perf_counter()
            await asyncio.gather(*(one(q) for q in clients))
            return n // CONCURRENCY * CONCURRENCY / (time.perf_counter() - started)
        queries = Queries(AsyncpgDriver(await asyncpg.connect(url)))
        started = time.perf_counter()
        for _ in range(n // batch):
            await queries.enqueue(["noop"] * batch, [None] * batch, [0] * batch)
        return n // batch * batch / (time.perf_counter() - started)

    return asyncio.run(main())


# The queue each processing measurement drains is filled by a child of its own beforehand, so
# that the CPU counted (the consumer's and PostgreSQL's) is the processing's alone.
ENQUEUE: dict[str, Callable[[str, int], None]] = {
    "heimdex": _heimdex_enqueue,
    "raw": _heimdex_enqueue,
    "baseline": _heimdex_enqueue,  # run in the baseline tree (see _interpreter)
    "pgqueuer": _pgqueuer_enqueue,
    "procrastinate": _procrastinate_enqueue,
}

CHILDREN: dict[str, Callable[[str, int, int], float]] = {
    "heimdex": child_heimdex,
    "pgqueuer": child_pgqueuer,
    "procrastinate": child_procrastinate,
    "raw": child_raw,
    "submit-heimdex": child_submit_heimdex,
    "submit-pgqueuer": child_submit_pgqueuer,
}


# The parent: one cluster, fresh databases per measurement, interleaved rounds, the table.


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Cluster:
    def __init__(self) -> None:
        from heimdex_db.localpg import LocalPostgres  # noqa: PLC0415

        self.pg = LocalPostgres.throwaway(durable=True).start()
        self._n = 0

    def fresh_database(self, system: str) -> str:
        """A new database prepared for `system`, as a plain postgresql:// URL."""
        from alembic import command  # noqa: PLC0415

        from heimdex_db.config import alembic_config  # noqa: PLC0415

        self._n += 1
        name = f"{system.replace('-', '_')}_{self._n}"
        url = self.pg.create_database(name)
        plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
        if system in ("heimdex", "raw", "submit-heimdex"):
            command.upgrade(alembic_config(database_url=url), "head")
        elif system in ("baseline", "submit-baseline"):
            assert BASELINE is not None
            # The checkout's own `heimdex db upgrade`: its modules may be named otherwise.
            heimdex = BASELINE / ".venv" / "bin" / "heimdex"
            subprocess.run(
                [heimdex, "db", "upgrade", "--database-url",
                 url.render_as_string(hide_password=False)],
                check=True, cwd=BASELINE, stdout=subprocess.DEVNULL,
                env={**os.environ, "HEIMDEX_LOG_LEVEL": "warning"},
            )  # fmt: skip
        elif system in ("pgqueuer", "submit-pgqueuer"):
            subprocess.run(
                [sys.executable, "-c",
                 "import asyncio, asyncpg, sys\n"
                 "from pgqueuer.db import AsyncpgDriver\nfrom pgqueuer.queries import Queries\n"
                 "async def m():\n"
                 "    await Queries(AsyncpgDriver(await asyncpg.connect(sys.argv[1]))).install()\n"
                 "asyncio.run(m())", plain],
                check=True,
            )  # fmt: skip
        elif system == "procrastinate":
            script = (
                "import procrastinate, sys\n"
                "connector = procrastinate.PsycopgConnector(conninfo=sys.argv[1])\n"
                "app = procrastinate.App(connector=connector)\n"
                "with app.open():\n    app.schema_manager.apply_schema()"
            )
            subprocess.run([sys.executable, "-c", script, plain], check=True)
        return plain

    def server_cpu(self) -> float:
        """CPU seconds of the cluster's processes that have exited (each measurement's
        backends exit with its child) plus the postmaster's own, from /proc."""
        pid = int((self.pg.datadir / "postmaster.pid").read_text().split()[0])
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    def destroy(self) -> None:
        self.pg.destroy()


@dataclass
class Measured:
    rate: float
    client_cpu: float | None = None  # seconds of the consumer process's CPU per job
    server_cpu: float | None = None  # seconds of PostgreSQL backends' CPU per job


# `--baseline TREE`: Heimdex as another checkout has it (its own venv and this script there),
# measured as the system "baseline" in the same rounds, so a change is judged side by side.
BASELINE: Path | None = None


def _interpreter(system: str) -> tuple[str, str, str]:
    """(python, script, system as that script knows it) for a child of `system`."""
    if BASELINE is not None and system.endswith("baseline"):
        python = BASELINE / ".venv" / "bin" / "python"
        return (
            str(python),
            str(BASELINE / "bench" / HERE.name),
            system.replace("baseline", "heimdex"),
        )
    return sys.executable, str(HERE), system


def _child(system: str, url: str, jobs: int, batch: int) -> dict[str, float] | None:
    python, script, as_system = _interpreter(system)
    proc = subprocess.run(
        [python, script, "--child", as_system, url, str(jobs), str(batch)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        _progress(f"  {system} batch {batch}: FAILED: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    out: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _analyze(url: str) -> None:
    """Statistics of the filled queue, as autovacuum keeps them in production. Without them the
    drain's plans depended on whether autovacuum had looked at the new rows yet: at 200k jobs
    Heimdex's claim passed the JIT threshold in one run and not in the next."""
    import psycopg  # noqa: PLC0415

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")


def measure(cluster: Cluster, system: str, jobs: int, batch: int) -> Measured | None:
    url = cluster.fresh_database(system)
    if system in ENQUEUE:
        if _child(f"enqueue:{system}", url, jobs, batch) is None:
            return None
        _analyze(url)
    server_before = cluster.server_cpu()
    out = _child(system, url, jobs, batch)
    if out is None:
        return None
    processing = system in ENQUEUE  # the submit rows' client is the load generator: not shown
    server = (cluster.server_cpu() - server_before) / jobs if processing else None
    result = Measured(out["rate"], out.get("cpu_per_job") if processing else None, server)
    cpu = (
        f"  client {result.client_cpu * 1e6:4.0f} us/job, PostgreSQL {server * 1e6:4.0f} us/job"
        if result.client_cpu is not None and server is not None
        else ""
    )
    _progress(f"  {system:>15} batch {batch:>4}: {result.rate:9.0f} jobs/s{cpu}")
    return result


def _print_table(
    jobs: int,
    rounds: int,
    rows: list[tuple[str, str, int, int]],
    results: dict[tuple[str, str, int], list[Measured]],
) -> None:
    def median(key: tuple[str, str, int], what: str) -> float | None:
        values = [getattr(m, what) for m in results.get(key, []) if getattr(m, what) is not None]
        return statistics.median(values) if values else None

    print(f"\n{jobs} no-op jobs, concurrency {CONCURRENCY}, PostgreSQL 15 with fsync on, "
          f"{rounds} interleaved rounds; medians, and the ratio to Heimdex (jobs/s: above 1"
          " is faster than Heimdex). CPU per job: the consumer process's, and PostgreSQL's"
          " backends'\n")  # fmt: skip
    print(
        f"| {'measure':<10} | {'system':<15} | {'batch':>5} | {'jobs/s':>8} | {'vs Heimdex':>10} "
        f"| {'client CPU/job':>14} | {'PostgreSQL CPU/job':>18} |"
    )
    print(f"|{'-' * 12}|{'-' * 17}|{'-' * 7}|{'-' * 10}|{'-' * 12}|{'-' * 16}|{'-' * 20}|")
    for section, system, batch, _ in rows:
        rate = median((section, system, batch), "rate")
        ours = median(
            (section, "submit-heimdex", batch)
            if section == "submit"
            else ("processing", "heimdex", batch if system != "procrastinate" else 1),
            "rate",
        )
        ratio = f"{rate / ours:.2f}x" if rate and ours else "-"
        shown = f"{rate:8.0f}" if rate else "  failed"
        client = median((section, system, batch), "client_cpu")
        server = median((section, system, batch), "server_cpu")
        client_s = f"{client * 1e6:.0f} us" if client is not None else "-"
        server_s = f"{server * 1e6:.0f} us" if server is not None else "-"
        print(
            f"| {section:<10} | {system:<15} | {batch:>5} | {shown} | {ratio:>10} "
            f"| {client_s:>14} | {server_s:>18} |"
        )


def main() -> None:  # noqa: PLR0912, PLR0915 - argument handling, the rounds and the table
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000, help="jobs per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--only", default="", help="comma-separated subset of the rows' systems")
    parser.add_argument("--skip-submit", action="store_true", help="processing rows only")
    parser.add_argument(
        "--orgs", type=int, default=10, help="orgs the processing jobs are spread over"
    )
    parser.add_argument(
        "--batches", default="1,10", help="claim batch sizes of the processing rows"
    )
    parser.add_argument(
        "--baseline",
        metavar="TREE",
        help="also run Heimdex from this checkout (with its own .venv) as 'baseline', "
        "interleaved in the same rounds",
    )
    parser.add_argument(
        "--caps",
        type=int,
        default=0,
        metavar="N",
        help="Heimdex: cap every org at N jobs running (above the concurrency: not binding)",
    )
    parser.add_argument(
        "--weights", action="store_true", help="Heimdex: weight the orgs 1, 2, 3, 1, ..."
    )
    parser.add_argument(
        "--queues",
        default="",
        metavar="Q,...",
        help="Heimdex: the worker claims these queues (jobs are in default)",
    )
    parser.add_argument("--child", nargs=4, metavar=("SYSTEM", "URL", "JOBS", "BATCH"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.child:
        system, url, jobs, batch = args.child
        if system.startswith("enqueue:"):
            ENQUEUE[system.removeprefix("enqueue:")](url, int(jobs))
            print(json.dumps({}))
            return
        rate = CHILDREN[system](url, int(jobs), int(batch))
        cpu = time.process_time() - _cpu_started
        print(json.dumps({"rate": rate, "cpu_per_job": cpu / int(jobs)}))
        return

    os.environ["BENCH_ORGS"] = str(args.orgs)  # read by the children that enqueue
    # Read by this checkout's Heimdex children only (a baseline's script knows none of them).
    os.environ["BENCH_CAP"] = str(args.caps)
    os.environ["BENCH_WEIGHTS"] = "1" if args.weights else ""
    os.environ["BENCH_QUEUES"] = args.queues
    rows: list[tuple[str, str, int, int]] = []  # (section, system, batch, jobs)
    systems = ("heimdex", "baseline", "pgqueuer", "procrastinate", "raw")
    if args.baseline:
        global BASELINE  # noqa: PLW0603 - set once, before any child runs
        BASELINE = Path(args.baseline).resolve()
        if not (BASELINE / ".venv" / "bin" / "python").exists():
            parser.error(f"--baseline {BASELINE}: no .venv there (run `uv sync` in it first)")
    else:
        systems = tuple(s for s in systems if s != "baseline")
    for batch in sorted({int(b) for b in args.batches.split(",")}):
        for system in systems:
            if system == "procrastinate" and batch != 1:
                continue  # no batch fetch: one row, at its only setting
            rows.append(("processing", system, batch, args.jobs))
    if not args.skip_submit:
        for batch in (1, 1000):
            for system in ("submit-heimdex", "submit-baseline", "submit-pgqueuer"):
                if system == "submit-baseline" and not args.baseline:
                    continue
                rows.append(("submit", system, batch, args.jobs if batch == 1 else args.jobs * 4))
    if args.only:
        wanted = set(args.only.split(","))
        rows = [r for r in rows if r[1].removeprefix("submit-") in wanted or r[1] in wanted]

    cluster = Cluster()
    results: dict[tuple[str, str, int], list[Measured]] = {(s, n, b): [] for s, n, b, _ in rows}
    try:
        for round_ in range(1, args.rounds + 1):
            _progress(f"round {round_}/{args.rounds}")
            # Every other round in reverse: whoever runs first in a round (a cold cache, a
            # neighbour's burst) is not always the same system.
            for section, system, batch, jobs in rows if round_ % 2 else rows[::-1]:
                result = measure(cluster, system, jobs, batch)
                if result is not None:
                    results[(section, system, batch)].append(result)
    finally:
        cluster.destroy()

    _print_table(args.jobs, args.rounds, rows, results)
    print(
        "\ntargets: processing >= PGQueuer at equal concurrency and batch; >= 1,500"
        " jobs/s end to end; API one by one >= 1,000/s; bulk >= 10,000/s"
    )


if __name__ == "__main__":
    main()
