"""Noop jobs through the ledger's submit -> claim -> complete path, on a throwaway cluster.

    uv run python bench/ledger_throughput.py --jobs 2000 --threads 1 2 4

Measures the database path only (no Redis, no Dramatiq): what a worker pays per job.
"""

from __future__ import annotations

import argparse
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from alembic import command
from sqlalchemy import create_engine, text

from heimdex_common.db import make_engine, make_session_factory, unit_of_work
from heimdex_common.ledger import service
from heimdex_common.localpg import LocalPostgres
from heimdex_common.migrations.config import alembic_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    with LocalPostgres.throwaway() as pg:
        admin = create_engine(pg.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("CREATE DATABASE bench"))
        admin.dispose()
        url = pg.url("bench")
        command.upgrade(alembic_config(database_url=url), "head")
        engine = make_engine(url, pool_size=max(args.threads) + 2)
        factory = make_session_factory(engine)
        org = uuid.uuid4()
        print(f"{'threads':>7} {'jobs':>6} {'submit/s':>9} {'claim+complete/s':>17}")
        for threads in args.threads:
            started = time.perf_counter()
            ids: list[uuid.UUID] = []
            for _ in range(args.jobs):
                with unit_of_work(factory) as s:
                    job, _ = service.submit_job(s, org_id=org, type="noop", params={})
                    ids.append(job.id)
            submit_rate = args.jobs / (time.perf_counter() - started)

            def run(job_id: uuid.UUID) -> None:
                with unit_of_work(factory) as s:
                    job = service.claim_job(s, job_id, worker_id="bench", lease_seconds=30)
                assert job is not None and job.lease_token is not None
                with unit_of_work(factory) as s:
                    service.complete_attempt(s, job_id, job.lease_token, result={})

            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(run, ids))
            run_rate = args.jobs / (time.perf_counter() - started)
            print(f"{threads:>7} {args.jobs:>6} {submit_rate:>9.0f} {run_rate:>17.0f}")
        engine.dispose()


if __name__ == "__main__":
    main()
