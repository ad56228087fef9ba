"""Connections a worker holds against its concurrency.

    uv run python bench/worker_connections.py [--concurrency 10,100,500] [--baseline TREE]

One throwaway PostgreSQL 15 cluster (max_connections 1200), a fresh database per run. Each run
submits `concurrency` long jobs (5 s in ten stages, a write at each boundary) and three short
jobs per slot, then starts `heimdex worker --concurrency C --batch 10` and samples
`pg_stat_activity` every 20 ms until every job is done: the most connections the worker held
(every client backend on the database but the sampler's), the most long jobs running at once
(slots in use), and the time from the worker's start to the last outcome. `--baseline TREE`
runs the same with another checkout's worker (its own .venv) beside this one's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from sqlalchemy import text

from heimdex.db import make_engine
from heimdex.ledger import repository
from heimdex.ledger.repository import NewJob
from heimdex_db.config import alembic_config
from heimdex_db.localpg import LocalPostgres

HERE = Path(__file__).resolve().parent
SHORT_PER_SLOT = 3
SECRET = "bench-secret-0123456789-0123456789-0123"  # noqa: S105 - a throwaway cluster's token
SAMPLE = text(
    "SELECT (SELECT count(*) FROM pg_stat_activity"
    "        WHERE datname = current_database() AND pid <> pg_backend_pid()"
    "          AND backend_type = 'client backend') AS connections,"
    "       count(*) FILTER (WHERE type = 'nap' AND status = 'running') AS napping,"
    "       count(*) FILTER (WHERE status = 'succeeded') AS succeeded"
    "  FROM job"
)


@dataclass
class Run:
    tree: str
    concurrency: int
    connections: int = 0
    napping: int = 0
    seconds: float = 0.0
    refused: str = ""


def _run(pg: LocalPostgres, python: str, run: Run) -> Run:
    url = pg.create_database(f"b_{uuid.uuid4().hex[:12]}")
    command.upgrade(alembic_config(database_url=url), "head")
    engine = make_engine(url, pool_size=1, max_overflow=0)
    total = run.concurrency * (1 + SHORT_PER_SLOT)
    org = uuid.uuid4()
    with engine.begin() as conn:
        repository.insert_jobs(conn, [NewJob(org, "nap", {}, None)] * run.concurrency)
        repository.insert_jobs(
            conn, [NewJob(org, "quick", {}, None)] * (run.concurrency * SHORT_PER_SLOT)
        )
    with tempfile.TemporaryFile() as log:
        env = {
            **os.environ,
            "DATABASE_URL": url.render_as_string(hide_password=False),
            "HEIMDEX_JWT_SECRET": SECRET,
            "HEIMDEX_JOB_MODULES": "worker_connections_jobs:jobs",
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        started = time.monotonic()
        worker = subprocess.Popen(
            [python, "-m", "heimdex", "worker", "--concurrency", str(run.concurrency),
             "--batch", "10"],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        try:
            succeeded = 0
            while succeeded < total and worker.poll() is None:
                with engine.connect() as conn:
                    row = conn.execute(SAMPLE).one()
                run.connections = max(run.connections, row.connections)
                run.napping = max(run.napping, row.napping)
                succeeded = row.succeeded
                time.sleep(0.02)
            run.seconds = time.monotonic() - started
            if succeeded < total:
                log.seek(0)
                lines = log.read().decode(errors="replace").strip().splitlines()
                run.refused = lines[-1][:80] if lines else f"exited {worker.returncode}"
        finally:
            worker.terminate()
            worker.wait()
    engine.dispose()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="10,100,500")
    parser.add_argument("--baseline", type=Path, help="another checkout (with its .venv)")
    args = parser.parse_args()
    trees = [("this", sys.executable)]
    if args.baseline:
        trees.append(("baseline", str(args.baseline.resolve() / ".venv" / "bin" / "python")))
    pg = LocalPostgres.throwaway(durable=True, max_connections=1200).start()
    runs: list[Run] = []
    try:
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            for tree, python in trees:
                run = _run(pg, python, Run(tree, concurrency))
                runs.append(run)
                print(run, file=sys.stderr)
    finally:
        pg.destroy()
    print("| worker | concurrency | long jobs running at once | connections held (peak) | "
          "all done in |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for run in runs:
        done = f"{run.seconds:.1f} s" if not run.refused else f"not done: {run.refused}"
        print(f"| {run.tree} | {run.concurrency} | {run.napping} | {run.connections} | {done} |")


if __name__ == "__main__":
    main()
