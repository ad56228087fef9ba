"""Job types of `bench/scheduling.py`, loaded by its worker processes (`HEIMDEX_JOB_MODULES`,
with `bench/` on PYTHONPATH): a sleep in the cpu queue and one in the gpu queue."""

from __future__ import annotations

import time

from pydantic import BaseModel

from heimdex.ledger.registry import JobContext, JobTypes

jobs = JobTypes()


class Sleep(BaseModel):
    seconds: float = 0.0


@jobs.register("cpu_sleep", params=Sleep, queue="cpu")
def cpu_sleep(_ctx: JobContext, params: Sleep) -> None:
    time.sleep(params.seconds)


@jobs.register("gpu_sleep", params=Sleep, queue="gpu")
def gpu_sleep(_ctx: JobContext, params: Sleep) -> None:
    time.sleep(params.seconds)
