"""The job type bench/failover.py runs: each run of its handler is recorded in `failover_run`.

Loaded by the API and the workers through `HEIMDEX_JOB_MODULES=failover_jobs:jobs` (the harness
puts bench/ on their PYTHONPATH). A run is recorded under a key of its own, with retries through
the failover (ON CONFLICT: a retried insert that had committed counts once), so a job with two
rows was started twice.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

import psycopg
from pydantic import BaseModel

from heimdex.ledger.registry import JobContext, JobTypes

jobs = JobTypes()
_local = threading.local()


class Probe(BaseModel):
    n: int
    ms: int = 50


def _record(run: uuid.UUID, params: Probe, attempt: int) -> None:
    while True:
        conn: psycopg.Connection[Any] | None = getattr(_local, "conn", None)
        try:
            if conn is None or conn.closed:
                conn = _local.conn = psycopg.connect(
                    os.environ["FAILOVER_CONNINFO"], autocommit=True
                )
            conn.execute(
                "INSERT INTO failover_run (run, n, attempt, pid, started)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (run) DO NOTHING",
                (run, params.n, attempt, os.getpid(), time.time()),
            )
            return
        except psycopg.Error:
            if conn is not None:
                conn.close()
            _local.conn = None
            time.sleep(0.2)


@jobs.register("failover_probe", params=Probe)
def probe(ctx: JobContext, params: Probe) -> dict[str, Any]:
    _record(uuid.uuid4(), params, ctx.attempt)
    time.sleep(params.ms / 1000)
    return {"n": params.n}
