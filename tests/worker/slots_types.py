"""Job types of the slot tests, loaded by real worker processes (`HEIMDEX_JOB_MODULES`)."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel

from heimdex.ledger.registry import JobContext, JobTypes

jobs = JobTypes()
NAP_STAGES = 10
NAP_STAGE_SECONDS = 0.5


class Empty(BaseModel):
    pass


@jobs.register("quick", params=Empty)
def quick(ctx: JobContext, params: Empty) -> dict[str, Any]:
    return {}


@jobs.register("nap", params=Empty)
def nap(ctx: JobContext, params: Empty) -> dict[str, Any]:
    """Sleeps through its stages; each boundary is a write of the handler's context."""
    for stage in range(1, NAP_STAGES + 1):
        time.sleep(NAP_STAGE_SECONDS)
        ctx.stage(f"nap{stage}", stage * 100 // NAP_STAGES)
    return {"stages": NAP_STAGES}
