"""Request and response bodies of the jobs API."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from heimdex_common.models import BackoffPolicy, Job, JobStatus

PARAMS_MAX_BYTES = 64 * 1024


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, max_length=100)
    params: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(default=0, ge=-1000, le=1000)
    max_attempts: int = Field(default=5, ge=1, le=100)
    backoff_policy: BackoffPolicy = BackoffPolicy.EXP

    @field_validator("params")
    @classmethod
    def _small_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(value, separators=(",", ":")).encode())
        if size > PARAMS_MAX_BYTES:
            raise ValueError(f"params is {size} bytes of JSON; the limit is {PARAMS_MAX_BYTES}")
        return value


class JobError(BaseModel):
    code: str | None
    message: str | None


class JobOut(BaseModel):
    id: uuid.UUID
    org_id: uuid.UUID
    type: str
    status: JobStatus
    attempt: int
    max_attempts: int
    backoff_policy: BackoffPolicy
    priority: int
    params: dict[str, Any]
    stage: str | None
    progress: int
    result: dict[str, Any] | None
    cancel_requested: bool
    last_error: JobError | None
    idempotency_key: str | None
    requested_by: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        error = (
            JobError(code=job.last_error_code, message=job.last_error_message)
            if job.last_error_code or job.last_error_message
            else None
        )
        return cls(
            id=job.id,
            org_id=job.org_id,
            type=job.type,
            status=job.status,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            backoff_policy=job.backoff_policy,
            priority=job.priority,
            params=job.params,
            stage=job.stage,
            progress=job.progress,
            result=job.result,
            cancel_requested=job.cancel_requested,
            last_error=error,
            idempotency_key=job.idempotency_key,
            requested_by=job.requested_by,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class EventOut(BaseModel):
    id: uuid.UUID
    ts: datetime
    prev_status: str | None
    next_status: str
    detail: dict[str, Any] | None


class EventList(BaseModel):
    items: list[EventOut]
