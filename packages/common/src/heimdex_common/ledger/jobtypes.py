"""The job types the ledger accepts and the shape of their params.

The contract lives here so the API can refuse a bad submission without importing the worker;
the worker registers one handler per type and refuses to start when one is missing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from heimdex_common.ledger.errors import InvalidParams, UnknownJobType

MOCK_STAGES = ("extracting", "analyzing", "indexing")


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MockProcessParams(_Params):
    """Three stages with a short sleep each; `fail_at_stage` raises there on every attempt."""

    fail_at_stage: Literal["extracting", "analyzing", "indexing"] | None = None
    stage_seconds: float = Field(default=0.5, ge=0, le=60)


class NoopParams(_Params):
    """Does nothing: measures the ledger's own claim/complete path."""


JOB_TYPES: dict[str, type[_Params]] = {
    "mock_process": MockProcessParams,
    "noop": NoopParams,
}


def validate_params(type: str, params: dict[str, Any]) -> dict[str, Any]:
    """The params of a `type` job with defaults filled in, or `UnknownJobType`/`InvalidParams`."""
    model = JOB_TYPES.get(type)
    if model is None:
        raise UnknownJobType(type, sorted(JOB_TYPES))
    try:
        return model.model_validate(params).model_dump(mode="json")
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidParams(type, problems) from None
