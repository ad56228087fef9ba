"""Job handlers: one function per job type of `heimdex_common.ledger.jobtypes`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from heimdex_common.ledger.jobtypes import MOCK_STAGES, MockProcessParams


class JobContext(Protocol):
    @property
    def attempt(self) -> int: ...

    def stage(self, name: str, progress: int) -> None:
        """Report a stage boundary; raises to stop the attempt (cancel, shutdown, lost lease)."""


class JobError(Exception):
    """A handler's failure with a stable error code. Retried unless `retryable` is False."""

    retryable = True

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class PermanentJobError(JobError):
    retryable = False


Handler = Callable[[JobContext, dict[str, Any]], dict[str, Any]]


def mock_process(ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """Upstream's demo job: extracting -> analyzing -> indexing, optionally failing at one."""
    p = MockProcessParams.model_validate(params)
    for i, stage in enumerate(MOCK_STAGES):
        ctx.stage(stage, progress=i * 100 // len(MOCK_STAGES))
        time.sleep(p.stage_seconds)
        if p.fail_at_stage == stage:
            raise JobError("MOCK_STAGE_FAILED", f"mock_process failed at stage {stage!r}")
    return {"stages": list(MOCK_STAGES), "attempt": ctx.attempt}


def noop(ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    return {}


HANDLERS: Mapping[str, Handler] = {"mock_process": mock_process, "noop": noop}
