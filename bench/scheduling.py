"""Scheduling with queues, caps and weights: cap violations, shares, a newcomer's wait, pickup
latency and claim latency.

    uv run python bench/scheduling.py [--orgs 100] [--backlog 10000] [--seconds 60]
    uv run python bench/scheduling.py --quick          # a short run of each part

One throwaway PostgreSQL 15 cluster with fsync on; a fresh database per part. The script runs
at nice 10 (`--nice`; its cluster and workers inherit it) and stops its worker processes by
their PIDs and its cluster when it ends, however it ends.

- mixed workload: two pools on one database, `cpu` and `gpu`, each served by `--pool-workers`
  worker processes of its own (`heimdex worker --queues cpu|gpu --concurrency 4`; the gpu pool
  with `--batch 1`, as its jobs are long). `--orgs` orgs: one with a `--backlog`-job backlog of
  cpu jobs and a cap of 2 running; in the gpu pool, 9 orgs weighted 1 and 3 with backlogs that
  outlast the run (two of them capped at 1 running in gpu); the others, weighted 1 and 3 in
  turn, with cpu backlogs sized to drain about half-way through (so the pool is saturated, then
  the big org runs alone at its cap). Jobs are sleeps: cpu 90 % short (20 ms) and 10 % long
  (0.5 s), gpu half short (0.1 s) and half long (1 s), times `--scale`. Every org's backlog is
  submitted before the workers start. A sampler counts the running jobs of each org and queue
  every 10 ms (`--sample-ms`) for `--seconds`; newcomer orgs submit one short job each at 20,
  35 and 50 % of the run, in each pool.
  Cap violations: samples where an org ran more than its cap (must be 0). Shares: over the
  samples where the pool was saturated (the orgs with queued work in it could fill its slots
  within their caps), the running jobs of the orgs with queued work are compared with their
  weighted fair share of those same running jobs, within their caps (water-filling: an org
  whose cap is below its weighted share gets its cap, the rest is shared by weight); summed
  over the samples and grouped by kind of org, with each org's ratio (measured / fair) in the
  range column. A newcomer's wait: from its job's `submitted` event to its `claimed` event, and
  the jobs of its pool that started meanwhile, against the bound: one job per other org with
  queued work in the pool and unit of its weight.
- pickup latency: one idle worker (`--queues gpu,cpu`, concurrency 4), `--pickup` no-op jobs
  submitted at `--rate` per second, in turn by an uncapped org, an org with a cap (not binding:
  its jobs are placed by the placing step, not by the submit), an org capped in its queue and
  weighted 3, and an uncapped org in the cpu queue. Pickup: from the job's `submitted` event to
  its `claimed` event (the server's clock, `clock_timestamp()` in both statements).
- claim latency: `--claim-jobs` queued jobs placed round-robin over 10 and over 10,000 orgs, in
  the two queues; a tenth of the orgs capped at 2 with the rest of their jobs held, a third
  weighted 3. Then `--claims` claims of 10 jobs (`repository.claim`, each in its own committed
  transaction) for one queue and for both, interleaved: the statement's wall time as the client
  waits for it (`repository.claim`: its round trip and the driver's work), and its execution
  on the server (`log_min_duration_statement = 0` on that database); p50, p99 and max.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
SECRET = "bench-secret-0123456789-0123456789-0123"  # noqa: S105 - a throwaway cluster's token
JOB_MODULES = "scheduling_jobs:jobs"  # bench/scheduling_jobs.py, on the workers' PYTHONPATH
CONCURRENCY = 4  # runner threads per worker process
CPU_SHORT, CPU_LONG, CPU_LONG_SHARE = 0.02, 0.5, 0.1
GPU_SHORT, GPU_LONG, GPU_LONG_SHARE = 0.1, 1.0, 0.5
GPU_WEIGHTS = (1, 1, 1, 1, 3, 3, 3, 3, 3)
GPU_CAPPED = (4, 5)  # indexes into GPU_WEIGHTS: weight 3, capped at 1 running in gpu
BIG_CAP = 2
NEWCOMERS_AT = (0.2, 0.35, 0.5)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# The cluster, its databases and the worker processes.


class Cluster:
    def __init__(self) -> None:
        import psycopg  # noqa: PLC0415

        from heimdex_db.localpg import LocalPostgres  # noqa: PLC0415

        self.pg = LocalPostgres.throwaway(durable=True).start()
        with psycopg.connect(self._plain(self.pg.url()), autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            self.version = str(row[0]) if row else "?"

    @staticmethod
    def _plain(url: Any) -> str:
        rendered: str = url.set(drivername="postgresql").render_as_string(hide_password=False)
        return rendered

    def fresh_database(self, name: str, tree: Path | None = None) -> str:
        """A new database migrated to head (by the checkout `tree`, its own interpreter, when
        given), as a plain postgresql:// URL."""
        from alembic import command  # noqa: PLC0415

        from heimdex_db.config import alembic_config  # noqa: PLC0415

        url = self.pg.create_database(name)
        if tree is None:
            command.upgrade(alembic_config(database_url=url), "head")
        else:
            upgrade = (
                "import sys\nfrom alembic import command\n"
                "from heimdex_db.config import alembic_config\n"
                "command.upgrade(alembic_config(database_url=sys.argv[1]), 'head')"
            )
            subprocess.run(
                [str(tree / ".venv" / "bin" / "python"), "-c", upgrade,
                 url.render_as_string(hide_password=False)],
                check=True, cwd=tree, capture_output=True,
            )  # fmt: skip
        return self._plain(url)

    @property
    def log(self) -> Path:
        return self.pg.socket_dir / "postgres.log"

    def durations(self, offset: int, marker: str) -> list[tuple[float, str]]:
        """(ms, statement) of each execution logged since `offset` whose text has `marker`
        (`log_min_duration_statement`: the statement on the server, no round trip)."""
        with self.log.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        out = []
        for record in re.split(r"(?m)^(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text):
            found = re.search(r"duration: ([0-9.]+) ms\s+execute ", record)
            if found and marker in record:
                out.append((float(found.group(1)), record))
        return out

    def destroy(self) -> None:
        self.pg.destroy()


@dataclass
class Workers:
    """`heimdex worker` processes on one database; their logs go to files."""

    url: str
    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start(self, queues: str | None, *, batch: int | None = None) -> None:
        """A worker of `queues` (None: a previous release's worker, the built-in job types
        only, which claims every job)."""
        args = ["worker", "--concurrency", str(CONCURRENCY)]
        if queues is not None:
            args += ["--queues", queues]
        if batch is not None:
            args += ["--batch", str(batch)]
        path = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
        env = {
            **os.environ,
            "DATABASE_URL": self.url,
            "HEIMDEX_JWT_SECRET": SECRET,
            "HEIMDEX_LOG_LEVEL": "info",
            "PYTHONPATH": path,
        }
        if queues is not None:
            env["HEIMDEX_JOB_MODULES"] = JOB_MODULES
        log = self.log_dir / f"worker-{len(self.procs)}-{(queues or 'all').replace(',', '+')}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "heimdex", *args],
                env=env, stdout=subprocess.DEVNULL, stderr=out,
            )  # fmt: skip
        self.procs.append(proc)
        self.logs.append(log)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        for proc, log in zip(self.procs, self.logs, strict=True):
            while "worker started" not in log.read_text(errors="replace"):
                if proc.poll() is not None:
                    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                    raise SystemExit(f"a worker exited ({proc.returncode}): {tail}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"a worker did not start within {timeout:.0f} s ({log})")
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM each by its PID, then SIGKILL whatever is left after the grace."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


@contextmanager
def workers(url: str) -> Iterator[Workers]:
    with tempfile.TemporaryDirectory(prefix="heimdex-schedbench-") as logs:
        pool = Workers(url, Path(logs))
        try:
            yield pool
        finally:
            pool.stop()


def _engine(url: str) -> Any:
    from heimdex.db import make_engine  # noqa: PLC0415

    return make_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def _set_limits(engine: Any, orgs: Sequence[Org]) -> None:
    from heimdex.ledger import control  # noqa: PLC0415

    who = control.Who("bench", "scheduling benchmark")
    with engine.begin() as conn:
        for org in orgs:
            if org.cap is not None or org.weight != 1:
                control.set_limit(
                    conn, who, org_id=org.id, max_running=org.cap,
                    weight=org.weight if org.weight != 1 else None,
                )  # fmt: skip
            if org.queue_cap is not None:
                control.set_limit(
                    conn, who, org_id=org.id, queue=org.queue, max_running=org.queue_cap
                )


def _submit(engine: Any, org: uuid.UUID, queue: str, durations: Sequence[float]) -> list[Any]:
    from heimdex.ledger import repository  # noqa: PLC0415
    from heimdex.ledger.repository import NewJob  # noqa: PLC0415

    type_ = f"{queue}_sleep"
    created = []
    for i in range(0, len(durations), 1000):
        jobs = [
            NewJob(org, type_, {"seconds": s}, None, queue=queue) for s in durations[i : i + 1000]
        ]
        with engine.begin() as conn:
            created += [j.id for j in repository.insert_jobs(conn, jobs)]
    return created


# The mixed workload.


@dataclass(frozen=True)
class Org:
    id: uuid.UUID
    kind: str  # the row of the shares table it is counted in
    queue: str
    weight: int = 1
    cap: int | None = None  # on the org's running jobs, every queue
    queue_cap: int | None = None  # on its running jobs in its queue

    @property
    def limit(self) -> float:
        caps = [c for c in (self.cap, self.queue_cap) if c is not None]
        return float(min(caps)) if caps else math.inf


def _mixed_orgs(args: argparse.Namespace) -> list[Org]:
    orgs = [Org(uuid.uuid4(), f"{args.backlog:,}-job backlog, cap {BIG_CAP}", "cpu", cap=BIG_CAP)]
    for i, weight in enumerate(GPU_WEIGHTS):
        capped = i in GPU_CAPPED
        kind = f"weight {weight}" + (", cap 1 in gpu" if capped else "")
        orgs.append(Org(uuid.uuid4(), kind, "gpu", weight, queue_cap=1 if capped else None))
    for i in range(args.orgs - len(orgs)):
        weight = 3 if i % 2 else 1
        orgs.append(Org(uuid.uuid4(), f"weight {weight}", "cpu", weight))
    return orgs


def _durations(rng: random.Random, n: int, queue: str, scale: float) -> list[float]:
    short, long_, share = (
        (CPU_SHORT, CPU_LONG, CPU_LONG_SHARE) if queue == "cpu"
        else (GPU_SHORT, GPU_LONG, GPU_LONG_SHARE)
    )  # fmt: skip
    return [(long_ if rng.random() < share else short) * scale for _ in range(n)]


def _mean(queue: str, scale: float) -> float:
    if queue == "cpu":
        return (CPU_SHORT * (1 - CPU_LONG_SHARE) + CPU_LONG * CPU_LONG_SHARE) * scale
    return (GPU_SHORT * (1 - GPU_LONG_SHARE) + GPU_LONG * GPU_LONG_SHARE) * scale


class Sampler(threading.Thread):
    """Running jobs per (org, queue) every `period` seconds, stamped with the server's clock."""

    SQL = """
SELECT extract(epoch FROM clock_timestamp())::float8,
       coalesce(array_agg(s.org_id::text), '{}'), coalesce(array_agg(s.queue::text), '{}'),
       coalesce(array_agg(s.n), '{}')
  FROM (SELECT org_id, queue, count(*) AS n FROM job WHERE status = 'running'
         GROUP BY org_id, queue) AS s"""

    def __init__(self, url: str, period: float) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.period = period
        self.samples: list[tuple[float, dict[tuple[str, str], int]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import psycopg  # noqa: PLC0415

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("SET enable_seqscan = off")
            tick = time.monotonic()
            while not self.stop.is_set():
                row = conn.execute(self.SQL, prepare=True).fetchone()
                assert row is not None
                running = zip(row[1], row[2], row[3], strict=True)
                self.samples.append((row[0], {(o, q): int(n) for o, q, n in running}))
                tick += self.period
                self.stop.wait(max(0.0, tick - time.monotonic()))


def waterfill(total: float, weights: dict[str, int], caps: dict[str, float]) -> dict[str, float]:
    """`total` shared by weight, no one above its cap; what a capped org leaves goes to the
    others by weight."""
    alloc: dict[str, float] = {}
    free = dict(weights)
    left = total
    while free:
        sum_w = sum(free.values())
        over = [k for k, w in free.items() if caps[k] <= left * w / sum_w]
        if not over:
            alloc.update({k: left * w / sum_w for k, w in free.items()})
            break
        for k in over:
            alloc[k] = caps[k]
            left -= caps[k]
            del free[k]
    return alloc


@dataclass
class Backlogs:
    """When each (org, queue) had queued jobs: its jobs' creation and start times, sorted."""

    created: dict[tuple[str, str], list[float]]
    started: dict[tuple[str, str], list[float]]

    def queued(self, key: tuple[str, str], at: float) -> int:
        return bisect.bisect_right(self.created.get(key, []), at) - bisect.bisect_right(
            self.started.get(key, []), at
        )


@dataclass
class MixedResult:
    samples: int
    period_ms: float
    seconds: float
    caps: list[tuple[str, int, int, int]]  # (scope, cap, most running seen, samples over)
    shares: dict[str, list[tuple[str, int, float, float, float, float]]]
    saturated: dict[str, tuple[float, float, float]]  # pool: (seconds, slots, mean running)
    newcomers: list[tuple[str, float, float, int, int]]
    finished: dict[str, int]
    clock: int = 0  # the turn clock at the end, from where it stood at the start
    fronts: dict[str, int] = field(default_factory=dict)  # each queue's lowest placed turn


def run_mixed(cluster: Cluster, args: argparse.Namespace) -> MixedResult:
    import psycopg  # noqa: PLC0415

    url = cluster.fresh_database("mixed")
    engine = _engine(url)
    rng = random.Random(25)
    orgs = _mixed_orgs(args)
    _set_limits(engine, orgs)
    slots = args.pool_workers * CONCURRENCY
    # gpu: enough for twice the run; cpu: the others' backlogs drain about half-way through.
    gpu_weight = sum(o.weight for o in orgs if o.queue == "gpu")
    gpu_jobs = 2 * args.seconds * slots / _mean("gpu", args.scale) / gpu_weight
    cpu_weight = sum(o.weight for o in orgs[1 + len(GPU_WEIGHTS) :])
    cpu_rate = 0.5 * slots / _mean("cpu", args.scale)  # half the ideal: workers' overhead
    cpu_jobs = 0.5 * args.seconds * cpu_rate / max(cpu_weight, 1)
    _progress(f"mixed: submitting {len(orgs)} orgs' backlogs")
    for i, org in enumerate(orgs):
        if i == 0:
            n = args.backlog
        else:
            per_weight = gpu_jobs if org.queue == "gpu" else cpu_jobs
            n = max(2, math.ceil(per_weight * org.weight))
        _submit(engine, org.id, org.queue, _durations(rng, n, org.queue, args.scale))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")
        row = conn.execute("SELECT last_value FROM job_turn_clock").fetchone()
        clock0 = int(row[0]) if row else 0
    newcomers: list[tuple[str, uuid.UUID]] = []
    sampler = Sampler(url, args.sample_ms / 1000)
    with workers(url) as pool:
        for _ in range(args.pool_workers):
            pool.start("cpu")
            pool.start("gpu", batch=1)
        pool.wait_ready()
        _progress(f"mixed: {len(pool.procs)} workers up; sampling for {args.seconds:.0f} s")
        sampler.start()
        started = time.monotonic()
        for at in NEWCOMERS_AT:
            time.sleep(max(0.0, started + at * args.seconds - time.monotonic()))
            for queue in ("cpu", "gpu"):
                org = uuid.uuid4()
                short = (CPU_SHORT if queue == "cpu" else GPU_SHORT) * args.scale
                (job,) = _submit(engine, org, queue, [short])
                newcomers.append((queue, job))
        time.sleep(max(0.0, started + args.seconds - time.monotonic()))
        sampler.stop.set()
        sampler.join()
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute("""
SELECT org_id::text, queue::text, extract(epoch FROM created_at)::float8,
       extract(epoch FROM started_at)::float8, status::text = 'succeeded'
  FROM job""").fetchall()
            # Where the queue stands: the turn clock (shared by the queues) against each
            # queue's lowest placed turn, in units of a weight-1 org's step.
            row = conn.execute("SELECT last_value FROM job_turn_clock").fetchone()
            clock = int(row[0]) if row else 0
            fronts = conn.execute(
                "SELECT queue::text, min(turn) FROM job WHERE status = 'queued'"
                " AND turn IS NOT NULL GROUP BY queue"
            ).fetchall()
            events = conn.execute(
                """
SELECT e.job_id, e.detail_json->>'action', extract(epoch FROM e.ts)::float8 FROM job_event AS e
 WHERE e.job_id = ANY(%(ids)s) AND e.detail_json->>'action' IN ('submitted', 'claimed')""",
                {"ids": [job for _, job in newcomers]},
            ).fetchall()
    engine.dispose()
    result = _analyse_mixed(args, orgs, slots, sampler, rows, newcomers, events)
    result.clock = clock - clock0
    result.fronts = {q: int(t) - clock0 for q, t in fronts}
    return result


def _analyse_mixed(  # noqa: PLR0912, PLR0915, PLR0917 - one analysis, in the tables' order
    args: argparse.Namespace,
    orgs: list[Org],
    slots: int,
    sampler: Sampler,
    rows: list[Any],
    newcomers: list[tuple[str, uuid.UUID]],
    events: list[Any],
) -> MixedResult:
    samples = sampler.samples
    # The sampler's period as achieved (a loaded machine stretches it).
    period = (samples[-1][0] - samples[0][0]) / (len(samples) - 1) if len(samples) > 1 else 0.0
    created: dict[tuple[str, str], list[float]] = defaultdict(list)
    started: dict[tuple[str, str], list[float]] = defaultdict(list)
    starts_by_queue: dict[str, list[float]] = defaultdict(list)
    finished: dict[str, int] = defaultdict(int)
    for org, queue, created_at, started_at, succeeded in rows:
        created[(org, queue)].append(created_at)
        if started_at is not None:
            started[(org, queue)].append(started_at)
            starts_by_queue[queue].append(started_at)
        finished[queue] += int(succeeded)
    for values in (*created.values(), *started.values(), *starts_by_queue.values()):
        values.sort()
    backlogs = Backlogs(created, started)

    # Caps: every sample, every capped scope.
    caps: list[tuple[str, int, int, int]] = []
    for org in orgs:
        for scope, cap in (("org", org.cap), (f"org in {org.queue}", org.queue_cap)):
            if cap is None:
                continue
            seen = [sum(n for (o, _q), n in s.items() if o == str(org.id)) for _, s in samples]
            caps.append((f"{org.kind} ({scope})", cap, max(seen, default=0),
                         sum(1 for n in seen if n > cap)))  # fmt: skip

    # Shares, per pool, over its saturated samples.
    shares: dict[str, list[tuple[str, int, float, float, float, float]]] = {}
    saturated: dict[str, tuple[float, float, float]] = {}
    for queue in ("gpu", "cpu"):
        pool_orgs = [o for o in orgs if o.queue == queue]
        fair: dict[str, float] = defaultdict(float)
        got: dict[str, float] = defaultdict(float)
        count, running_sum = 0, 0.0
        for at, sample in samples:
            busy = [o for o in pool_orgs if backlogs.queued((str(o.id), queue), at) > 0]
            if sum(o.limit for o in busy) < slots:
                continue  # not saturated: the orgs with queued work could not fill the pool
            running = {str(o.id): sample.get((str(o.id), queue), 0) for o in busy}
            total = sum(running.values())
            if not total:
                continue
            count += 1
            running_sum += sum(n for (_o, q), n in sample.items() if q == queue)
            alloc = waterfill(
                total, {str(o.id): o.weight for o in busy}, {str(o.id): o.limit for o in busy}
            )
            for key, value in alloc.items():
                fair[key] += value
                got[key] += running[key]
        saturated[queue] = (count * period, slots, running_sum / max(count, 1))
        total_fair, total_got = sum(fair.values()), sum(got.values())
        kinds: dict[str, list[Org]] = defaultdict(list)
        for org in pool_orgs:
            if fair.get(str(org.id)):
                kinds[org.kind].append(org)
        table = []
        for kind, members in kinds.items():
            f = sum(fair[str(o.id)] for o in members)
            g = sum(got[str(o.id)] for o in members)
            ratios = [got[str(o.id)] / fair[str(o.id)] for o in members]
            table.append((kind, len(members), 100 * f / total_fair, 100 * g / total_got,
                          min(ratios), max(ratios)))  # fmt: skip
        shares[queue] = sorted(table, key=lambda r: -r[2])

    # Newcomers: wait, jobs of their pool started meanwhile, and the bound.
    times: dict[uuid.UUID, dict[str, float]] = defaultdict(dict)
    for job, action, ts in events:
        times[job][action] = ts
    first = samples[0][0] if samples else 0.0
    out = []
    for queue, job in newcomers:
        submitted, claimed = times[job].get("submitted"), times[job].get("claimed")
        if submitted is None or claimed is None:
            out.append((queue, (submitted or first) - first, math.nan, -1, -1))
            continue
        starts = starts_by_queue[queue]
        ahead = bisect.bisect_left(starts, claimed) - bisect.bisect_right(starts, submitted)
        bound = sum(
            o.weight
            for o in orgs
            if o.queue == queue and backlogs.queued((str(o.id), queue), submitted) > 0
        )
        out.append((queue, submitted - first, claimed - submitted, max(ahead - 1, 0), bound))
    span = samples[-1][0] - first if len(samples) > 1 else 0.0
    return MixedResult(
        samples=len(samples),
        period_ms=1000 * span / max(len(samples) - 1, 1),
        seconds=span,
        caps=caps,
        shares=shares,
        saturated=saturated,
        newcomers=out,
        finished=dict(finished),
    )


def print_mixed(args: argparse.Namespace, r: MixedResult) -> None:
    print(
        f"\n### Mixed workload: {args.orgs} orgs, 2 pools of {args.pool_workers} workers x "
        f"{CONCURRENCY} threads, {args.seconds:.0f} s, durations x {args.scale}\n"
    )
    print(
        f"{r.samples} samples of the running jobs over {r.seconds:.1f} s (one every "
        f"{r.period_ms:.1f} ms); jobs finished: cpu {r.finished.get('cpu', 0):,}, "
        f"gpu {r.finished.get('gpu', 0):,}\n"
    )
    print("| capped scope | cap | most running in a sample | samples over the cap |")
    print("|---|---|---|---|")
    for scope, cap, most, over in r.caps:
        print(f"| {scope} | {cap} | {most} | {over} |")
    for queue, rows in r.shares.items():
        seconds, slots, mean = r.saturated[queue]
        print(
            f"\n{queue} pool ({slots:.0f} runner threads): saturated for {seconds:.1f} s of "
            f"samples, {mean:.1f} jobs running on average meanwhile. Share of the running jobs "
            "of the orgs with queued work: fair (by weight, within caps) and measured\n"
        )
        print("| orgs | n | fair share | measured share | measured / fair | per org: min - max |")
        print("|---|---|---|---|---|---|")
        for kind, n, fair, got, low, high in rows:
            print(
                f"| {kind} | {n} | {fair:.1f} % | {got:.1f} % | {got / fair:.2f} "
                f"| {low:.2f} - {high:.2f} |"
            )
    print(
        "\nNewcomers (a new org's first job, submitted while the pool is busy): wait from "
        "`submitted` to `claimed`; jobs of its pool started meanwhile; the bound: one job per "
        "other org with queued work in the pool and unit of its weight\n"
    )
    print("| pool | submitted at (s) | wait (ms) | jobs started ahead | bound |")
    print("|---|---|---|---|---|")
    for queue, at, wait, ahead, bound in r.newcomers:
        if math.isnan(wait):
            print(f"| {queue} | {at:.1f} | not claimed by the end | - | {bound} |")
        else:
            print(f"| {queue} | {at:.1f} | {wait * 1000:.0f} | {ahead} | {bound} |")
    unit = 720720  # a weight-1 org's step (scopes.TURN_UNIT)
    fronts = ", ".join(f"{q} {t / unit:,.0f}" for q, t in sorted(r.fronts.items()))
    print(
        f"\nAt the end, in rounds (a weight-1 org's step) from the start: the turn clock "
        f"{r.clock / unit:,.0f}; each queue's lowest placed turn: {fronts or '-'} (a newcomer "
        "is placed at the clock)"
    )


# Pickup latency.

PICKUP_VARIANTS = (
    ("no cap, gpu", "gpu"),
    ("org capped (1000), gpu", "gpu"),
    ("org capped in gpu (1000), weight 3", "gpu"),
    ("no cap, cpu", "cpu"),
)


PREVIOUS = "previous release (--baseline): no cap, default queue"


def pickup_child(url: str, n: int, rate: float, baseline: bool) -> dict[str, list[float]]:
    """One pickup run, in a process of its own: the checkout measured is the one whose
    interpreter runs it (`--baseline`: a previous release, without queues or caps)."""
    import psycopg  # noqa: PLC0415

    from heimdex.ledger import repository  # noqa: PLC0415
    from heimdex.ledger.repository import NewJob  # noqa: PLC0415

    engine = _engine(url)
    if baseline:
        orgs = [Org(uuid.uuid4(), PREVIOUS, "default")]
    else:
        orgs = [
            Org(uuid.uuid4(), PICKUP_VARIANTS[0][0], "gpu"),
            Org(uuid.uuid4(), PICKUP_VARIANTS[1][0], "gpu", cap=1000),
            Org(uuid.uuid4(), PICKUP_VARIANTS[2][0], "gpu", weight=3, queue_cap=1000),
            Org(uuid.uuid4(), PICKUP_VARIANTS[3][0], "cpu"),
        ]
        _set_limits(engine, orgs)
    ids: dict[str, list[uuid.UUID]] = defaultdict(list)
    with workers(url) as pool:
        pool.start(None if baseline else "gpu,cpu")
        pool.wait_ready()
        time.sleep(1.0)  # the worker's first claims and its LISTEN are done: it is idle
        started = time.monotonic()
        for i in range(n):
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
            org = orgs[i % len(orgs)]
            if baseline:  # the built-in no-op type (a previous release's NewJob has no queue)
                with engine.begin() as conn:
                    (record,) = repository.insert_jobs(conn, [NewJob(org.id, "noop", {}, None)])
                job = record.id
            else:
                (job,) = _submit(engine, org.id, org.queue, [0.0])
            ids[org.kind].append(job)
        every = [j for jobs in ids.values() for j in jobs]
        deadline = time.monotonic() + 30
        with psycopg.connect(url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT count(*) FROM job WHERE id = ANY(%s) AND status = 'succeeded'",
                    (every,),
                ).fetchone()
                if row and row[0] == len(every):
                    break
                time.sleep(0.1)
            rows = conn.execute(
                """
SELECT s.job_id, extract(epoch FROM c.ts - s.ts)::float8 FROM job_event AS s
  JOIN job_event AS c ON c.job_id = s.job_id AND c.detail_json->>'action' = 'claimed'
 WHERE s.job_id = ANY(%s) AND s.detail_json->>'action' = 'submitted'""",
                (every,),
            ).fetchall()
    engine.dispose()
    pickup = {job: seconds for job, seconds in rows}
    return {kind: [pickup[j] for j in jobs if j in pickup] for kind, jobs in ids.items()}


def run_pickup(cluster: Cluster, args: argparse.Namespace) -> dict[str, list[float]]:
    """The pickup run of this checkout and, with `--baseline`, of the other at the same time
    (each its own database, worker and submitter, so the machine's load hits both alike)."""
    runs = {"current": (sys.executable, cluster.fresh_database("pickup"))}
    if args.baseline:
        python = args.baseline / ".venv" / "bin" / "python"
        runs["baseline"] = (str(python), cluster.fresh_database("pickup_base", tree=args.baseline))
    _progress(f"pickup: {args.pickup} submits at {args.rate:g}/s ({', '.join(runs)})")
    procs = {}
    for name, (python, url) in runs.items():
        procs[name] = subprocess.Popen(
            [python, str(HERE), "--pickup-child", url, str(args.pickup), str(args.rate),
             "1" if name == "baseline" else "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    out: dict[str, list[float]] = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            _progress(f"pickup {name}: FAILED: {stderr.strip().splitlines()[-3:]}")
            continue
        out.update(json.loads(stdout.strip().splitlines()[-1]))
    return out


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def print_pickup(args: argparse.Namespace, result: dict[str, list[float]]) -> None:
    print(
        f"\n### Pickup latency: one idle worker (--queues gpu,cpu, concurrency {CONCURRENCY}), "
        f"{args.pickup} submits at {args.rate:g}/s, the orgs in turn; from the job's "
        "`submitted` event to its `claimed` event"
        + (f" (beside it at the same time: {args.baseline})" if args.baseline else "")
        + "\n"
    )
    print("| submitted by | jobs | p50 (ms) | p99 (ms) | max (ms) |")
    print("|---|---|---|---|---|")
    every = [v for kind, values in result.items() if kind != PREVIOUS for v in values]
    rows = [(k, v) for k, v in result.items() if k != PREVIOUS] + [("all of the above", every)]
    if PREVIOUS in result:
        rows.append((PREVIOUS, result[PREVIOUS]))
    for kind, values in rows:
        if not values:
            print(f"| {kind} | 0 | - | - | - |")
            continue
        print(
            f"| {kind} | {len(values)} | {_pct(values, 0.5) * 1000:.1f} "
            f"| {_pct(values, 0.99) * 1000:.1f} | {max(values) * 1000:.1f} |"
        )
    print("\ntarget: p99 <= 5 ms with queues and caps on")


# Claim latency.

CLAIM_LOAD = """
INSERT INTO job (org_id, type, params, queue, attempt, run_at, created_at, turn, held)
SELECT o.org, CASE WHEN g %% 2 = 0 THEN 'gpu_sleep' ELSE 'cpu_sleep' END, '{}'::jsonb,
       CASE WHEN g %% 2 = 0 THEN 'gpu' ELSE 'cpu' END, 1, now() - interval '1 minute',
       now() - interval '1 minute',
       CASE WHEN o.capped AND g / %(n)s >= %(cap)s THEN NULL
            ELSE (g / %(n)s) * %(unit)s::bigint END,
       o.capped AND g / %(n)s >= %(cap)s
  FROM generate_series(0, %(jobs)s - 1) AS g
 CROSS JOIN LATERAL (SELECT (CAST(%(orgs)s AS uuid[]))[1 + g %% %(n)s] AS org,
                            g %% %(n)s < %(capped)s AS capped) AS o
"""
CLAIM_LIMITS = """
INSERT INTO job_limit (org_id, max_running, weight, used, waiting)
SELECT o.org, CASE WHEN o.i <= %(capped)s THEN %(cap)s END,
       CASE WHEN o.i %% 3 = 0 THEN 3 ELSE 1 END,
       CASE WHEN o.i <= %(capped)s THEN least(%(cap)s, %(per_org)s) ELSE 0 END,
       o.i <= %(capped)s AND %(per_org)s > %(cap)s
  FROM unnest(CAST(%(orgs)s AS uuid[])) WITH ORDINALITY AS o(org, i)
 WHERE o.i <= %(capped)s OR o.i %% 3 = 0
"""
CLAIM_VARIANTS = (("gpu",), ("gpu", "cpu"))


@dataclass
class ClaimResult:
    orgs: int
    queues: tuple[str, ...]
    client: list[float]
    server: list[float]
    jobs: int


def run_claims(cluster: Cluster, args: argparse.Namespace, n_orgs: int) -> list[ClaimResult]:
    import psycopg  # noqa: PLC0415

    from heimdex.ledger import repository  # noqa: PLC0415
    from heimdex.ledger.repository.scopes import TURN_UNIT  # noqa: PLC0415

    url = cluster.fresh_database(f"claims_{n_orgs}")
    orgs = [uuid.uuid4() for _ in range(n_orgs)]
    capped = max(1, n_orgs // 10)
    _progress(f"claims: loading {args.claim_jobs:,} jobs over {n_orgs:,} orgs")
    with psycopg.connect(url, autocommit=True) as conn:
        params = {"orgs": orgs, "n": n_orgs, "jobs": args.claim_jobs, "cap": 2,
                  "capped": capped, "unit": TURN_UNIT,
                  "per_org": args.claim_jobs // n_orgs}  # fmt: skip
        conn.execute(CLAIM_LOAD, params)
        conn.execute(CLAIM_LIMITS, params)
        conn.execute("VACUUM ANALYZE job")
        conn.execute("ANALYZE")
        conn.execute(f"ALTER DATABASE claims_{n_orgs} SET log_min_duration_statement = 0")
    offset = cluster.log.stat().st_size
    engine = _engine(url)
    client: dict[tuple[str, ...], list[float]] = {q: [] for q in CLAIM_VARIANTS}
    taken: dict[tuple[str, ...], int] = dict.fromkeys(CLAIM_VARIANTS, 0)
    with engine.connect() as conn:
        for _ in range(args.claims):
            for queues in CLAIM_VARIANTS:
                with conn.begin():
                    began = time.perf_counter()
                    claim = repository.claim(
                        conn, worker_id="bench", limit=10, lease_seconds=600, queues=queues
                    )
                    client[queues].append(time.perf_counter() - began)
                taken[queues] += len(claim.jobs)
    engine.dispose()
    server: dict[tuple[str, ...], list[float]] = {q: [] for q in CLAIM_VARIANTS}
    for ms, statement in cluster.durations(offset, "lease_token = gen_random_uuid()"):
        server[CLAIM_VARIANTS[1] if "UNION ALL" in statement else CLAIM_VARIANTS[0]].append(ms)
    out = [
        ClaimResult(n_orgs, q, client[q], [ms / 1000 for ms in server[q]], taken[q])
        for q in CLAIM_VARIANTS
    ]
    return out


def print_claims(args: argparse.Namespace, results: list[ClaimResult]) -> None:
    print(
        f"\n### Claim latency: {args.claim_jobs:,} queued jobs placed over N orgs in 2 queues "
        f"(a tenth of the orgs capped at 2, the rest of their jobs held; a third weighted 3); "
        f"{args.claims:,} claims of 10 jobs per row, interleaved, each committed\n"
    )
    print(
        "| orgs with queued work | claim reads | jobs claimed | client p50 / p99 / max (ms) "
        "| server p50 / p99 / max (ms) |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.orgs:,} | {' + '.join(r.queues)} | {r.jobs:,} | {_spread(r.client)} "
            f"| {_spread(r.server)} |"
        )


def _spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return (
        f"{_pct(values, 0.5) * 1000:.2f} / {_pct(values, 0.99) * 1000:.2f} / "
        f"{max(values) * 1000:.1f}"
    )


# The parent.


def _machine(cluster: Cluster) -> str:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return (
        f"nproc {os.cpu_count()}, {pages / 2**30:.0f} GiB RAM, Linux {platform.release()}, "
        f"PostgreSQL {cluster.version} (fsync on)"
    )


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:  # noqa: PLR0912, PLR0915 - the options, checked, then the parts
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orgs", type=int, default=100, help="orgs of the mixed workload")
    parser.add_argument("--backlog", type=int, default=10_000, help="the big org's backlog")
    parser.add_argument("--seconds", type=float, default=60.0, help="the mixed workload's run")
    parser.add_argument("--scale", type=float, default=1.0, help="times the jobs' durations")
    parser.add_argument("--pool-workers", type=int, default=2, help="worker processes per pool")
    parser.add_argument("--sample-ms", type=float, default=10.0, help="the sampler's period")
    parser.add_argument("--pickup", type=int, default=600, help="pickup: jobs submitted")
    parser.add_argument("--rate", type=float, default=20.0, help="pickup: submits per second")
    parser.add_argument("--claim-jobs", type=int, default=100_000, help="claims: queued jobs")
    parser.add_argument("--claims", type=int, default=1000, help="claims: per row")
    parser.add_argument(
        "--only", default="mixed,pickup,claims", help="a subset of: mixed, pickup, claims"
    )
    parser.add_argument(
        "--baseline",
        metavar="TREE",
        type=Path,
        help="pickup: also run a previous release's checkout (with its own .venv), at the "
        "same time, as a row of its own",
    )
    parser.add_argument("--pickup-child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument(
        "--nice",
        type=int,
        default=10,
        choices=range(20),
        metavar="N",
        help="niceness added to the script, its cluster and workers (0 to 19, default 10)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run: 20 s, a backlog of 2,000, 200 pickups, 20,000 jobs and 300 claims",
    )
    args = parser.parse_args()
    if args.pickup_child:
        url, n, rate, baseline = args.pickup_child
        print(json.dumps(pickup_child(url, int(n), float(rate), baseline == "1")))
        return
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / ".venv" / "bin" / "python").exists():
            parser.error(f"--baseline {args.baseline}: no .venv there (run `uv sync` in it)")
    if args.quick:
        args.seconds, args.backlog, args.pickup = 20.0, 2000, 200
        args.claim_jobs, args.claims = 20_000, 300
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if unknown := parts - {"mixed", "pickup", "claims"}:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    if args.orgs < 1 + len(GPU_WEIGHTS) + 2:
        parser.error(f"--orgs must be at least {1 + len(GPU_WEIGHTS) + 2}")
    for name in ("backlog", "seconds", "scale", "pool_workers", "sample_ms", "pickup", "rate",
                 "claim_jobs", "claims"):  # fmt: skip
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.claim_jobs < 20 * args.claims * len(CLAIM_VARIANTS):
        parser.error("--claim-jobs must hold the claims' jobs: at least 20 x --claims x 2")

    os.nice(args.nice)  # the cluster and the workers start from here: they inherit it
    # Stopped by SIGTERM, the run still stops its workers and removes its cluster (`finally`).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    _progress(f"load average before: {_load()}")
    cluster = Cluster()
    try:
        print(
            f"Machine: {_machine(cluster)}; nice {args.nice}; load average at the start: {_load()}"
        )
        if "mixed" in parts:
            print_mixed(args, run_mixed(cluster, args))
        if "pickup" in parts:
            print_pickup(args, run_pickup(cluster, args))
        if "claims" in parts:
            results: list[ClaimResult] = []
            for n_orgs in (10, 10_000):
                results += run_claims(cluster, args, n_orgs)
            print_claims(args, results)
    finally:
        cluster.destroy()
    print(f"\nload average at the end: {_load()}")


if __name__ == "__main__":
    main()
