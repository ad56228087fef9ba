"""The built-in job types: `noop`, upstream's `mock_process` and `heimdex.backfill` (the
batches of a data revision's backfill, `heimdex.ledger.backfills`), and the pattern for new
ones."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from heimdex.ledger import backfills
from heimdex.ledger.registry import JobContext, JobError, JobTypes

MOCK_STAGES = ("extracting", "analyzing", "indexing")

jobs = JobTypes()


class NoopParams(BaseModel):
    """Nothing: a `noop` job measures the ledger's own claim and outcome path."""

    model_config = ConfigDict(extra="forbid")


class MockProcessParams(BaseModel):
    """Three stages with a short sleep each; `fail_at_stage` raises there on every attempt."""

    model_config = ConfigDict(extra="forbid")

    fail_at_stage: Literal["extracting", "analyzing", "indexing"] | None = None
    stage_seconds: float = Field(default=0.5, ge=0, le=60)


@jobs.register("noop", params=NoopParams)
def noop(ctx: JobContext, params: NoopParams) -> dict[str, Any]:
    return {}


@jobs.register("mock_process", params=MockProcessParams)
def mock_process(ctx: JobContext, params: MockProcessParams) -> dict[str, Any]:
    """Upstream's demo job: extracting -> analyzing -> indexing, optionally failing at one."""
    for i, stage in enumerate(MOCK_STAGES):
        ctx.stage(stage, progress=i * 100 // len(MOCK_STAGES))
        time.sleep(params.stage_seconds)
        if params.fail_at_stage == stage:
            raise JobError("MOCK_STAGE_FAILED", f"mock_process failed at stage {stage!r}")
    return {"stages": list(MOCK_STAGES), "attempt": ctx.attempt}


jobs.register(backfills.BACKFILL_TYPE, params=backfills.BackfillParams)(backfills.run)
