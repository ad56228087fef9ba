"""The job type the workers of bench/long_jobs.py run (`HEIMDEX_JOB_MODULES=long_jobs_types:jobs`,
with bench/ on PYTHONPATH): a long job that sleeps in stages, as a transcode or an analysis
waits on its tool, recording each stage boundary."""

from __future__ import annotations

import random
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from heimdex.ledger.registry import JobContext, JobTypes

jobs = JobTypes()

# How often a sleeping handler looks for a timeout or a shutdown (no database round trip).
CHECK_SECONDS = 5.0


class LongSleepParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(gt=0)
    stage_seconds: float = Field(default=60.0, gt=0)


@jobs.register("long_sleep", params=LongSleepParams)
def long_sleep(ctx: JobContext, params: LongSleepParams) -> dict[str, Any]:
    started = time.monotonic()
    # The first stage's length is drawn, so that jobs started together do not all record
    # their stages in the same second for ever after.
    length = random.uniform(0, params.stage_seconds)
    stage = 0
    while (elapsed := time.monotonic() - started) < params.seconds:
        ctx.stage(f"part-{stage}", progress=int(100 * elapsed / params.seconds))
        stage += 1
        until = min(started + params.seconds, time.monotonic() + length)
        length = params.stage_seconds
        while (left := until - time.monotonic()) > 0:
            time.sleep(min(left, CHECK_SECONDS))
            ctx.check()
    return {"stages": stage}
