"""The operator API of the queues under /ops: caps on jobs running at once, org weights, and
pauses of a queue, a job type or an org (`heimdex.ledger.control`, the same functions as
`heimdex limits`, `heimdex pause` and `heimdex resume`). Reads need an operator role, changes
`heimdex_admin`; every change is an event naming the caller and the reason."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from heimdex.ledger import control
from heimdex_api.ops import Admin, Reader
from heimdex_api.problems import problem_responses
from heimdex_api.routes import State, _autocommit

router = APIRouter(
    prefix="/ops",
    tags=["operators"],
    responses=problem_responses(400, 401, 403, 408, 413, 422, 503),
)

REASON = Field(min_length=1, max_length=control.REASON_MAX, description="Why (in the event)")


class LimitOut(BaseModel):
    org_id: uuid.UUID | None = Field(description="NULL: every org of the queue")
    queue: str | None = Field(description="NULL: every queue of the org")
    max_running: int | None = Field(description="Most jobs running at once; NULL: no cap")
    weight: int = Field(description="The org's weight in the fair queue")
    used: int = Field(description="Jobs placed or running counted against the cap now")
    waiting: bool = Field(description="Held jobs wait for a slot of this scope")
    updated_at: datetime

    @classmethod
    def of(cls, limit: control.Limit) -> LimitOut:
        return cls(**vars(limit))


class PauseOut(BaseModel):
    kind: Literal["queue", "type", "org"]
    value: str
    actor: str
    reason: str
    since: datetime


class ControlState(BaseModel):
    limits: list[LimitOut]
    pauses: list[PauseOut]


class LimitIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    org_id: uuid.UUID | None = None
    queue: str | None = Field(default=None, min_length=1, max_length=100)
    max_running: int | None = Field(default=None, ge=0, le=control.MAX_RUNNING_MAX)
    weight: int | None = Field(default=None, ge=1, le=control.WEIGHT_MAX)
    reason: str = REASON


class LimitUnset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    org_id: uuid.UUID | None = None
    queue: str | None = Field(default=None, min_length=1, max_length=100)
    cap: bool = Field(default=True, description="Drop the cap")
    weight: bool = Field(default=True, description="Drop the weight")
    reason: str = REASON


class PauseIn(BaseModel):
    """Exactly one of queue, type, org_id."""

    model_config = ConfigDict(extra="forbid")

    queue: str | None = Field(default=None, min_length=1, max_length=100)
    type: str | None = Field(default=None, min_length=1, max_length=100)
    org_id: uuid.UUID | None = None
    reason: str = REASON

    @model_validator(mode="after")
    def _one(self) -> PauseIn:
        if sum(v is not None for v in (self.queue, self.type, self.org_id)) != 1:
            raise ValueError("name exactly one of queue, type, org_id")
        return self

    def target(self) -> tuple[str, str]:
        if self.queue is not None:
            return "queue", self.queue
        if self.type is not None:
            return "type", self.type
        return "org", str(self.org_id)


class PauseResult(PauseOut):
    held: int = Field(description="Queued jobs the pause holds")


class ControlEvent(BaseModel):
    ts: datetime
    action: str
    scope: dict[str, Any]
    actor: str
    reason: str


class ControlEvents(BaseModel):
    items: list[ControlEvent]


@router.get("/limits", response_model=ControlState)
def read_limits(state: State, _: Reader) -> ControlState:
    """Every cap and weight, with the slots each cap counts now, and every pause."""
    with _autocommit(state) as conn:
        limits = control.list_limits(conn)
        pauses = control.list_pauses(conn)
    return ControlState(
        limits=[LimitOut.of(x) for x in limits],
        pauses=[PauseOut(**vars(p)) for p in pauses],
    )


@router.put("/limits", response_model=LimitOut)
def set_limit(body: LimitIn, state: State, caller: Admin) -> LimitOut:
    """Set the cap on jobs running at once of an org (`org_id`), an org in a queue (both) or a
    queue (`queue`), and/or an org's weight (`org_id` alone). 422 for a scope or value that
    cannot be; nothing is changed then."""
    with state.engine.begin() as conn:
        limit = control.set_limit(
            conn, control.Who(caller.sub, body.reason), org_id=body.org_id, queue=body.queue,
            max_running=body.max_running, weight=body.weight,
        )  # fmt: skip
    return LimitOut.of(limit)


@router.post("/limits/unset", response_model=LimitOut, responses=problem_responses(404))
def unset_limit(body: LimitUnset, state: State, caller: Admin) -> LimitOut:
    """Drop a scope's cap and/or weight (its held jobs go back to the queue); answers what it
    was. 404 when none is set."""
    with state.engine.begin() as conn:
        before = control.unset_limit(
            conn, control.Who(caller.sub, body.reason), org_id=body.org_id, queue=body.queue,
            cap=body.cap, weight=body.weight,
        )  # fmt: skip
    return LimitOut.of(before)


@router.post(
    "/pause", response_model=PauseResult, status_code=201, responses=problem_responses(409)
)
def pause(body: PauseIn, state: State, caller: Admin) -> PauseResult:
    """Pause a queue, a job type or an org: its queued jobs are not claimed until resumed;
    running jobs finish. 409 when it is already paused."""
    kind, value = body.target()
    with state.engine.begin() as conn:
        paused, held = control.pause(conn, control.Who(caller.sub, body.reason), kind=kind,
                                     value=value)  # fmt: skip
    with state.engine.begin() as conn:
        held += control.hold_stragglers(conn, kind=kind, value=value)
    return PauseResult(**vars(paused), held=held)


@router.post("/resume", response_model=PauseOut, responses=problem_responses(404))
def resume(body: PauseIn, state: State, caller: Admin) -> PauseOut:
    """Resume a paused queue, job type or org; the workers are woken at once (NOTIFY). Answers
    the pause lifted; 404 when it was not paused."""
    kind, value = body.target()
    with state.engine.begin() as conn:
        lifted = control.resume(conn, control.Who(caller.sub, body.reason), kind=kind,
                                value=value)  # fmt: skip
    return PauseOut(**vars(lifted))


@router.get("/control-events", response_model=ControlEvents)
def control_events(
    state: State, _: Reader, limit: int = Query(default=50, ge=1, le=500)
) -> ControlEvents:
    """The latest changes of caps, weights and pauses, newest first, with actor and reason."""
    with _autocommit(state) as conn:
        rows = control.list_events(conn, limit=limit)
    return ControlEvents(items=[ControlEvent(**r) for r in rows])
