"""Job types of the schedule tests: one declared with a every-minute schedule."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel

from heimdex.ledger.registry import JobContext, JobTypes

SCHEDULE_ORG = uuid.UUID("5c4ed01e-0000-4000-8000-000000000001")
jobs = JobTypes()


class TickParams(BaseModel):
    label: str = "tick"


@jobs.register(
    "minutely",
    params=TickParams,
    schedule="* * * * *",
    schedule_org=SCHEDULE_ORG,
    schedule_params={"label": "every minute"},
)
def minutely(ctx: JobContext, params: TickParams) -> dict[str, Any]:
    return {"label": params.label}
