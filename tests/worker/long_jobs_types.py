"""Job types of the long-job tests, loaded by real worker processes (`HEIMDEX_JOB_MODULES`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psycopg
from pydantic import BaseModel

from heimdex.ledger.registry import JobContext, JobTypes

jobs = JobTypes()
STAGES = 4


class ResumableParams(BaseModel):
    key: str
    hold_file: str = ""


class CappedParams(BaseModel):
    pass


def _count_run(key: str, stage: int) -> None:
    """The handler's own count of its stage runs, beside the ledger (a test reads it)."""
    url = os.environ["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO stage_runs (key, stage) VALUES (%s, %s)", (key, stage))


@jobs.register("resumable", params=ResumableParams)
def resumable(ctx: JobContext, params: ResumableParams) -> dict[str, Any]:
    """Four stages, each saved by a checkpoint; stage 3 waits while `hold_file` exists."""
    done = int(ctx.state.get("done", 0))
    total = int(ctx.state.get("total", 0))
    for stage in range(done + 1, STAGES + 1):
        _count_run(params.key, stage)
        if stage == 3:
            while params.hold_file and Path(params.hold_file).exists():
                ctx.check()
                time.sleep(0.05)
        total += stage * stage
        ctx.checkpoint(f"stage{stage}", stage * 100 // STAGES, {"done": stage, "total": total})
    return {"total": total}


@jobs.register("capped", params=CappedParams, timeout="1m")
def capped(ctx: JobContext, params: CappedParams) -> dict[str, Any]:
    return {}
