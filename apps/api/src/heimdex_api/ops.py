"""The operator API under /ops: every org's jobs, for tokens with an operator role. Reads need
`heimdex_operator_readonly` or `heimdex_admin`; changes need `heimdex_admin`. Thin: the work is
`heimdex.ledger.operations`, the same functions as `heimdex jobs`."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from sqlalchemy import Connection

from heimdex.ledger import backfills, repository
from heimdex.ledger import operations as ops
from heimdex.ledger import schedules as sched
from heimdex.ledger.fingerprint import error_fingerprint
from heimdex.ledger.repository import JobFilter
from heimdex.models import JobStatus
from heimdex_api.auth import Principal, require_operator
from heimdex_api.problems import problem_responses
from heimdex_api.routes import Caller, State, _autocommit, _decode_cursor, _encode_cursor
from heimdex_api.schemas import EventOut, JobOut, JobPage, Timestamp
from heimdex_api.state import AppState

router = APIRouter(
    prefix="/ops",
    tags=["operators"],
    responses=problem_responses(400, 401, 403, 408, 413, 422, 503),
)


async def reader(caller: Caller) -> Principal:
    return require_operator(caller)


async def admin(caller: Caller) -> Principal:
    return require_operator(caller, act=True)


Reader = Annotated[Principal, Depends(reader)]
Admin = Annotated[Principal, Depends(admin)]


class Filter(BaseModel):
    """Which jobs: every given criterion must hold."""

    model_config = ConfigDict(extra="forbid")

    ids: list[uuid.UUID] | None = Field(default=None, max_length=10_000)
    # `status`, as `GET /ops/jobs` and the job call it; `states` is still read.
    status: list[JobStatus] = Field(
        default_factory=list, validation_alias=AliasChoices("status", "states")
    )
    type: str | None = Field(default=None, max_length=100)
    org_id: uuid.UUID | None = None
    error_code: str | None = Field(default=None, max_length=64)
    fingerprint: str | None = Field(default=None, max_length=64)
    created_after: Timestamp | None = None
    created_before: Timestamp | None = None

    def job_filter(self) -> JobFilter:
        return JobFilter(
            ids=tuple(self.ids) if self.ids is not None else None,
            statuses=tuple(self.status),
            type=self.type,
            org_id=self.org_id,
            error_code=self.error_code,
            error_fingerprint=self.fingerprint,
            created_after=self.created_after,
            created_before=self.created_before,
        )


class Act(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(
        default=None, max_length=ops.REASON_MAX,
        description="Why; required for retry. Written to the job's event with your `sub`.",
    )  # fmt: skip
    from_scratch: bool = Field(
        default=False,
        description="Retry only: drop the job's checkpoint, so the next attempt starts afresh "
        "instead of resuming.",
    )


class BulkAct(Act):
    filter: Filter
    dry_run: bool = False
    batch_size: int = Field(default=ops.DEFAULT_BATCH_SIZE, ge=1, le=ops.MAX_BATCH_SIZE)


class BulkOut(BaseModel):
    action: ops.Action
    dry_run: bool
    jobs: int = Field(description="Jobs changed (in a dry run: that would be)")
    batches: int


class JobDetail(BaseModel):
    job: JobOut
    error_fingerprint: str | None
    events: list[EventOut]


class Counts(BaseModel):
    by_status: dict[str, int]
    by_type: dict[str, dict[str, int]]
    by_org: dict[uuid.UUID, dict[str, int]]
    oldest_due: JobOut | None
    oldest_due_seconds: float
    minutes: int
    per_minute: list[dict[str, int]] = Field(description="minutes_ago, succeeded, failed")


class FailureGroupOut(BaseModel):
    error_code: str | None
    fingerprint: str
    jobs: int
    orgs: int
    types: list[str]
    sample_message: str | None
    sample_job_id: uuid.UUID
    last_failed_at: datetime | None


class FailureList(BaseModel):
    items: list[FailureGroupOut]


def detail_of(conn: Any, job_id: uuid.UUID) -> JobDetail:
    job = repository.get_job(conn, job_id)
    fingerprint = (
        error_fingerprint(job.last_error_code, job.last_error_message)
        if job.last_error_code or job.last_error_message
        else None
    )
    return JobDetail(
        job=JobOut.of(job),
        error_fingerprint=fingerprint,
        events=[
            EventOut(
                id=e.id, ts=e.ts, prev_status=e.prev_status, next_status=e.next_status,
                detail=e.detail_json,
            )
            for e in repository.list_events(conn, job_id)
        ],
    )  # fmt: skip


def _replica(state: AppState) -> Connection:
    """A read that accepts lag: lists, stats and failures. A job's own page and every action
    stay on the primary (an operator reads a job right after acting on it)."""
    return state.reads.connect().execution_options(isolation_level="AUTOCOMMIT")


@router.get("/jobs", response_model=JobPage)
def list_jobs(
    *,
    state: State,
    _: Reader,
    status: Annotated[list[JobStatus] | None, Query()] = None,
    type: Annotated[str | None, Query(max_length=100)] = None,
    org_id: uuid.UUID | None = None,
    error_code: Annotated[str | None, Query(max_length=64)] = None,
    fingerprint: Annotated[str | None, Query(max_length=64)] = None,
    created_after: Timestamp | None = None,
    created_before: Timestamp | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> JobPage:
    """Jobs of every org, newest first, filtered; keyset pages like `GET /jobs`."""
    f = JobFilter(
        statuses=tuple(status or ()), type=type, org_id=org_id, error_code=error_code,
        error_fingerprint=fingerprint, created_after=created_after, created_before=created_before,
    )  # fmt: skip
    before = _decode_cursor(cursor) if cursor else None
    with _replica(state) as conn:
        jobs = repository.list_jobs_ops(conn, f, limit=limit + 1, before=before)
    items = [JobOut.of(job) for job in jobs[:limit]]
    next_cursor = _encode_cursor(items[-1].created_at, items[-1].id) if len(jobs) > limit else None
    return JobPage(items=items, next_cursor=next_cursor)


@router.get("/jobs/{job_id}", response_model=JobDetail, responses=problem_responses(404))
def read_job(job_id: uuid.UUID, state: State, _: Reader) -> JobDetail:
    """One job of any org with its error fingerprint and its events."""
    with _autocommit(state) as conn:
        return detail_of(conn, job_id)


@router.post(
    "/jobs/{job_id}/{action}", response_model=JobOut, responses=problem_responses(404, 409)
)
def act(job_id: uuid.UUID, action: ops.Action, body: Act, state: State, caller: Admin) -> JobOut:
    """`retry` (dead_letter, failed or canceled: queued now, attempts from 0, resuming from the
    job's checkpoint unless `from_scratch`; a reason is required), `cancel` (queued: now;
    running: at its next stage) or `requeue` (queued: due now). 409 when the job's state does
    not allow it."""
    with state.engine.begin() as conn:
        job = ops.operate(
            conn, action, job_id, ops.Operator(caller.sub, body.reason),
            from_scratch=body.from_scratch,
        )  # fmt: skip
    return JobOut.of(job)


@router.post("/bulk/{action}", response_model=BulkOut)
def bulk(action: ops.Action, body: BulkAct, state: State, caller: Admin) -> BulkOut:
    """`action` on every job matching the filter (which must not be empty), in batches of
    `batch_size` jobs, each its own transaction. `dry_run` answers the count only."""
    result = ops.bulk(
        state.engine, action, body.filter.job_filter(), ops.Operator(caller.sub, body.reason),
        dry_run=body.dry_run, batch_size=body.batch_size, from_scratch=body.from_scratch,
    )  # fmt: skip
    return BulkOut(action=action, dry_run=result.dry_run, jobs=result.jobs, batches=result.batches)


@router.get("/stats", response_model=Counts)
def stats(
    state: State,
    _: Reader,
    org_id: uuid.UUID | None = None,
    minutes: Annotated[int, Query(ge=1, le=1440)] = 60,
) -> Counts:
    """Counts by state, type and org; the oldest due job; attempts ended per minute."""
    with _replica(state) as conn:
        s = ops.stats(conn, org_id=org_id, minutes=minutes)
    return Counts(
        by_status=s.by_status,
        by_type=s.by_type,
        by_org=s.by_org,
        oldest_due=JobOut.of(s.oldest_due) if s.oldest_due else None,
        oldest_due_seconds=round(s.oldest_due_seconds, 3),
        minutes=minutes,
        per_minute=[vars(m) for m in s.throughput],
    )


@router.get("/failures", response_model=FailureList)
def failures(
    state: State,
    _: Reader,
    status: Annotated[list[JobStatus] | None, Query()] = None,
    org_id: uuid.UUID | None = None,
    type: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> FailureList:
    """Dead letters (or `status`) grouped by error code and fingerprint, largest first."""
    with _replica(state) as conn:
        groups = ops.failures(
            conn, statuses=status or [JobStatus.DEAD_LETTER], org_id=org_id, type=type,
            limit=limit,
        )  # fmt: skip
    return FailureList(items=[FailureGroupOut(**vars(g)) for g in groups])


class BackfillOut(BaseModel):
    name: str
    revision: str = Field(description="The data revision that recorded it")
    table_name: str
    state: str = Field(
        description="done, or its job's status (queued, running, failed, dead_letter, "
        "canceled), or `no job`"
    )
    percent: int
    rows_done: int
    estimated_rows: int = Field(description="Rows in the table when it was recorded")
    batches_done: int
    batch_size: int
    rows_per_second: float | None
    pause_factor: float | None
    paused_seconds: float
    job_id: uuid.UUID | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class BackfillList(BaseModel):
    items: list[BackfillOut]


@router.get("/backfills", response_model=BackfillList)
def list_backfills(state: State, _: Reader) -> BackfillList:
    """The backfills data revisions handed to the ledger (`heimdex.backfill` jobs, in the
    system org), oldest first, with their progress."""
    with _autocommit(state) as conn:
        found = backfills.progress(conn)
    return BackfillList(
        items=[
            BackfillOut(
                **{k: v for k, v in vars(b).items() if k in BackfillOut.model_fields},
                state=b.state,
                percent=b.percent,
            )
            for b in found
        ]
    )


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    org_id: uuid.UUID
    name: str = Field(min_length=1, max_length=100, description="Unique per org, without ':'")
    type: str = Field(min_length=1, max_length=100)
    cron: str = Field(min_length=1, max_length=200, description="Five fields, UTC")
    params: dict[str, Any] = Field(default_factory=dict)


class ScheduleOut(BaseModel):
    org_id: uuid.UUID
    name: str
    type: str
    params: dict[str, Any]
    cron: str
    declared: bool = Field(description="Declared by a job type rather than added per org")
    paused: bool
    next_fire_at: datetime
    last_fire_at: datetime | None
    last_job_id: uuid.UUID | None
    last_job_status: str | None


class ScheduleList(BaseModel):
    items: list[ScheduleOut]


@router.get("/schedules", response_model=ScheduleList)
def list_schedules(state: State, _: Reader, org_id: uuid.UUID | None = None) -> ScheduleList:
    """Periodic schedules (every org's, or `org_id`'s) by next fire time, with their last
    job and its status."""
    with _autocommit(state) as conn:
        found = sched.list_schedules(conn, org_id)
    return ScheduleList(items=[ScheduleOut(**vars(s)) for s in found])


@router.post(
    "/schedules", response_model=ScheduleOut, status_code=201, responses=problem_responses(409)
)
def add_schedule(body: ScheduleIn, state: State, _: Admin) -> ScheduleOut:
    """Add an org's schedule: each fire time of `cron` submits one job of `type` with
    `params` under `org_id`. 409 when the org has a schedule of that name; 422 for a bad
    cron expression, an unknown type or invalid params."""
    with state.engine.begin() as conn:
        added = sched.add_schedule(
            conn, state.registry, org_id=body.org_id, name=body.name, type=body.type,
            cron=body.cron, params=body.params,
        )  # fmt: skip
    return ScheduleOut(**vars(added))


@router.post(
    "/schedules/{org_id}/{name}/{action}",
    response_model=ScheduleOut,
    responses=problem_responses(404),
)
def pause_schedule(
    org_id: uuid.UUID, name: str, action: Literal["pause", "resume"], state: State, _: Admin
) -> ScheduleOut:
    """`pause` (no fire until resumed) or `resume` (from the next fire time to come; the ones
    missed while paused are skipped)."""
    with state.engine.begin() as conn:
        changed = sched.set_paused(conn, org_id, name, paused=action == "pause")
    return ScheduleOut(**vars(changed))


@router.delete("/schedules/{org_id}/{name}", status_code=204, responses=problem_responses(404))
def remove_schedule(org_id: uuid.UUID, name: str, state: State, _: Admin) -> None:
    """Remove the schedule; the jobs it submitted stay."""
    with state.engine.begin() as conn:
        sched.remove_schedule(conn, org_id, name)
