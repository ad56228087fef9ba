"""What server-side prepared statements save on the hot path, and what a transaction pooler costs.

    uv run python bench/pooler_prepare.py [--jobs 2000] [--rounds 3]

One throwaway PostgreSQL 15 cluster (fsync off: a commit's flush, the same in every
configuration, would drown the statements' own cost) and a throwaway pgbouncer in front of it; one
database per configuration, each migrated to head. In each configuration one thread submits
`--jobs` jobs one per statement (the API's one-job submit), then claims them 4 at a time and
writes each batch's outcomes (the worker's claim and outcome statements), timing every call.
Configurations run interleaved, round after round, so a noisy neighbour hits them alike; the
table shows each statement's median and mean over all rounds, in microseconds.

- direct, prepared: what a direct or session connection runs (psycopg prepares the claim and
  the outcomes at once, the submit from its fifth run; JIT off for the session);
- direct, unprepared: the same statements with nothing prepared (`prepare_threshold=None`);
- direct, transaction path: what `HEIMDEX_DB_POOL_MODE=transaction` runs, on a direct
  connection: unprepared, no session setting, and the claim sent as `SET LOCAL jit = off;
  <claim>` in one simple-protocol message (parameters bound client-side);
- pgbouncer transaction / session: the transaction path through pgbouncer in transaction mode,
  and the prepared path through it in session mode.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from alembic import command
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL

from heimdex.db import make_engine
from heimdex.ledger import repository, service
from heimdex.ledger.registry import load_registry
from heimdex.settings import PoolMode
from heimdex_db.config import alembic_config
from heimdex_db.localpg import LocalPostgres
from heimdex_db.localpooler import Pgbouncer

BATCH = 4


@dataclass
class Config:
    name: str
    url: URL
    mode: PoolMode
    prepare: bool
    times: dict[str, list[float]] = field(
        default_factory=lambda: {"submit": [], "claim": [], "outcomes": []}
    )

    def engine(self) -> Engine:
        args: dict[str, Any] = {} if self.prepare else {"prepare_threshold": None}
        return make_engine(self.url, pool_mode=self.mode, connect_args=args)


def _timed(into: list[float], fn: Callable[[], Any]) -> Any:
    started = time.perf_counter_ns()
    value = fn()
    into.append((time.perf_counter_ns() - started) / 1000)
    return value


def run_round(config: Config, jobs: int) -> None:
    engine = config.engine()
    registry = load_registry()
    org = uuid.uuid4()
    spec = service.JobSpec(type="noop", params={})
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:

            def submit(c: Connection = conn) -> object:
                return service.submit_jobs(c, registry, org_id=org, specs=[spec])

            for _ in range(jobs):
                _timed(config.times["submit"], submit)

            def claim() -> repository.Claim:
                return repository.claim(conn, worker_id="bench", limit=BATCH, lease_seconds=30)

            done = 0
            while done < jobs:
                got = _timed(config.times["claim"], claim)
                if not got.jobs:
                    break
                outcomes = [service.succeeded(job, {}) for job in got.jobs]
                _timed(
                    config.times["outcomes"], lambda o=outcomes: repository.write_outcomes(conn, o)
                )
                done += len(got.jobs)
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pg = LocalPostgres.throwaway().start()
    bouncers = [Pgbouncer(pg.url(), pool_mode=m, default_pool_size=4).start()
                for m in ("transaction", "session")]  # fmt: skip
    try:

        def database(name: str) -> str:
            url = pg.create_database(name)
            command.upgrade(alembic_config(database_url=url), "head")
            return name

        configs = [
            Config("direct, prepared", pg.url(database("b_prepared")), PoolMode.DIRECT, True),
            Config("direct, unprepared", pg.url(database("b_unprepared")), PoolMode.DIRECT, False),
            Config("direct, transaction path", pg.url(database("b_txpath")),
                   PoolMode.TRANSACTION, False),
            Config("pgbouncer transaction", bouncers[0].url(database("b_pgb_tx")),
                   PoolMode.TRANSACTION, False),
            Config("pgbouncer session", bouncers[1].url(database("b_pgb_session")),
                   PoolMode.SESSION, True),
        ]  # fmt: skip
        for _ in range(args.rounds):
            for config in configs:
                run_round(config, args.jobs)
        print(f"{args.jobs} jobs x {args.rounds} rounds; one thread; claims of {BATCH}; µs")
        print(f"| {'configuration':<26} | submit median | mean | claim median | mean |"
              " outcomes median | mean |")  # fmt: skip
        print(f"|{'-' * 28}|---:|---:|---:|---:|---:|---:|")
        for config in configs:
            cells = []
            for what in ("submit", "claim", "outcomes"):
                values = config.times[what]
                cells += [f"{statistics.median(values):.0f}", f"{statistics.fmean(values):.0f}"]
            print(f"| {config.name:<26} | " + " | ".join(cells) + " |")
    finally:
        for bouncer in bouncers:
            bouncer.stop()
        pg.destroy()


if __name__ == "__main__":
    main()
