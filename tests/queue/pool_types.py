"""Job types of the pool tests, loaded by real worker processes (`HEIMDEX_JOB_MODULES`): the
same sleep in the default queue and in the gpu queue."""

from __future__ import annotations

import time

from pydantic import BaseModel

from heimdex.ledger.registry import JobContext, JobTypes

jobs = JobTypes()


class Sleep(BaseModel):
    seconds: float = 0.05


@jobs.register("work", params=Sleep)
def work(_ctx: JobContext, params: Sleep) -> None:
    time.sleep(params.seconds)


@jobs.register("gpu_work", params=Sleep, queue="gpu")
def gpu_work(_ctx: JobContext, params: Sleep) -> None:
    time.sleep(params.seconds)
