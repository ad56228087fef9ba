"""The HTTP surface. Handlers are sync `def`s: FastAPI runs them in its thread pool, so the
blocking database calls never hold the event loop."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime
from typing import Annotated, Any

import pydantic_core
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Connection, text

from heimdex.db import server_address
from heimdex.ledger import repository, service
from heimdex.models import JobStatus
from heimdex_api.auth import PRINCIPAL_KEY, Principal, bearer, decode_token
from heimdex_api.problems import BadRequest, problem, problem_responses
from heimdex_api.schemas import (
    IDEMPOTENCY_KEY_MAX,
    BatchCreate,
    BatchResult,
    EventList,
    EventOut,
    JobCreate,
    JobOut,
    JobPage,
    job_fields,
)
from heimdex_api.state import AppState
from heimdex_db.head import schema_problem

# Every route may answer these; routes add their own (404, 409) with `responses=`.
router = APIRouter(responses=problem_responses(400, 401, 408, 413, 422, 503))
JOB_ERRORS = problem_responses(404)


# Dependencies that do not block are `async def`: FastAPI runs a sync dependency in its thread
# pool, and each such hop (a queue put, a thread wake-up, a GIL handoff) costs more CPU than the
# function itself (in process, a sync /healthz took 526 µs of CPU, an async one 112 µs).
async def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.heimdex
    return state


async def principal(
    request: Request,
    state: Annotated[AppState, Depends(app_state)],
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    checked: Principal | None = request.scope.get("state", {}).get(PRINCIPAL_KEY)
    if checked is not None:  # decoded by the guard before the body was read (app.py)
        return checked
    return decode_token(bearer(authorization), state.settings.jwt_secret.get_secret_value())


State = Annotated[AppState, Depends(app_state)]
Caller = Annotated[Principal, Depends(principal)]


def _encode_cursor(created_at: datetime, job_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(job_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, job_id = json.loads(raw)
        return datetime.fromisoformat(ts), uuid.UUID(job_id)
    except (binascii.Error, ValueError, TypeError):
        raise BadRequest("cursor is not one this API issued; pass next_cursor back as is") from None


def _autocommit(state: AppState) -> Connection:
    """A connection whose every statement commits on its own: one round trip per statement,
    for the paths that are one statement (or only read)."""
    return state.engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def _submit(
    state: AppState, caller: Principal, specs: list[service.JobSpec]
) -> list[service.Submitted]:
    # One statement when no key can clash; otherwise a transaction, so a refused batch
    # (IdempotencyConflict after the insert) leaves nothing behind.
    atomic = len(specs) == 1 or all(spec.idempotency_key is None for spec in specs)
    connect = _autocommit(state) if atomic else state.engine.begin()
    with connect as conn:
        return service.submit_jobs(
            conn, state.registry, org_id=caller.org_id, specs=specs, requested_by=caller.sub
        )


@router.post(
    "/jobs",
    status_code=201,
    response_model=JobOut,
    responses={200: {"model": JobOut, "description": "A replay"}, **problem_responses(409)},
)
def submit(
    body: JobCreate,
    state: State,
    caller: Caller,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= IDEMPOTENCY_KEY_MAX:
        raise BadRequest(f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters")
    (submitted,) = _submit(state, caller, [body.spec(idempotency_key)])
    # Serialized here, not validated again into the response model (see submit_batch).
    return Response(
        pydantic_core.to_json(job_fields(submitted.job)),
        status_code=201 if submitted.created else 200,
        media_type="application/json",
    )


@router.post(
    "/jobs/batch",
    status_code=201,
    response_model=BatchResult,
    responses={200: {"model": BatchResult, "description": "Nothing new"}, **problem_responses(409)},
)
def submit_batch(body: BatchCreate, state: State, caller: Caller) -> Response:
    """Up to 1,000 jobs in one statement. All or nothing: any invalid item refuses the batch
    (422, naming the item); each item may carry its own idempotency key."""
    submitted = _submit(state, caller, [item.spec(item.idempotency_key) for item in body.jobs])
    # `BatchResult` serialized straight from plain values by pydantic's serializer: building
    # 1,000 `JobOut`s first, then dumping them, cost more than the insert's Python.
    result = {
        "items": [
            {"index": i, "created": item.created, "job": job_fields(item.job)}
            for i, item in enumerate(submitted)
        ]
    }
    return Response(
        pydantic_core.to_json(result),
        status_code=201 if any(item.created for item in submitted) else 200,
        media_type="application/json",
    )


@router.get("/jobs", response_model=JobPage)
def list_(
    *,
    state: State,
    caller: Caller,
    status: JobStatus | None = None,
    type: Annotated[str | None, Query(max_length=100)] = None,
    queue: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> JobPage:
    before = _decode_cursor(cursor) if cursor else None
    with _autocommit(state) as conn:
        jobs = repository.list_jobs(
            conn, org_id=caller.org_id, status=status, type=type, limit=limit + 1, before=before,
            queue=queue,
        )  # fmt: skip
    items = [JobOut.of(job) for job in jobs[:limit]]
    next_cursor = _encode_cursor(items[-1].created_at, items[-1].id) if len(jobs) > limit else None
    return JobPage(items=items, next_cursor=next_cursor)


@router.get("/jobs/{job_id}", response_model=JobOut, responses=JOB_ERRORS)
def read(job_id: uuid.UUID, state: State, caller: Caller) -> JobOut:
    with _autocommit(state) as conn:
        return JobOut.of(repository.get_job(conn, job_id, org_id=caller.org_id))


@router.get("/jobs/{job_id}/events", response_model=EventList, responses=JOB_ERRORS)
def events(job_id: uuid.UUID, state: State, caller: Caller) -> EventList:
    with _autocommit(state) as conn:
        repository.get_job(conn, job_id, org_id=caller.org_id)
        rows = repository.list_events(conn, job_id)
    return EventList(
        items=[
            EventOut(
                id=e.id,
                ts=e.ts,
                prev_status=e.prev_status,
                next_status=e.next_status,
                detail=e.detail_json,
            )
            for e in rows
        ]
    )


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobOut,
    responses={202: {"model": JobOut, "description": "Will stop"}, **problem_responses(404, 409)},
)
def cancel(job_id: uuid.UUID, response: Response, state: State, caller: Caller) -> JobOut:
    """200 when the job is canceled now; 202 when a running job will stop at its next stage."""
    with state.engine.begin() as conn:
        job = service.cancel_job(conn, org_id=caller.org_id, job_id=job_id, requested_by=caller.sub)
    if job.status is not JobStatus.CANCELED:
        response.status_code = 202
    return JobOut.of(job)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=None,
    responses={503: problem_responses(503)[503] | {"description": "Not ready"}},
)
def readyz(request: Request, state: State) -> Any:
    checks: dict[str, str] = {}
    node: str | None = None
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            # Of a multi-host URL (an HA cluster), the server this process writes to now.
            node = server_address(conn)
            behind = schema_problem(conn, state.schema_head, state.schema_known)
        checks["postgres"] = "ok"
        checks["schema"] = behind or "ok"
    except Exception as exc:
        checks["postgres"] = f"unreachable: {type(exc).__name__}"
        checks["schema"] = "unknown"
    failing = {name: reason for name, reason in checks.items() if reason != "ok"}
    if failing:
        detail = "; ".join(f"{name}: {reason}" for name, reason in failing.items())
        return problem(503, "not-ready", detail, request, checks=checks)
    return JSONResponse({"status": "ready", "node": node, "checks": checks})


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
