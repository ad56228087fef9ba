"""Every error leaves the API as RFC 9457 problem details, mapped here and only here."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from heimdex.db import database_problem
from heimdex.errors import (
    DatabaseDiskFull,
    DatabaseOutOfResources,
    DatabasePoolerError,
    DatabaseProblem,
    DatabaseTooManyConnections,
    DatabaseUnavailable,
    HeimdexError,
    flatten_validation_errors,
)
from heimdex.ledger.control import ControlConflict, ControlNotFound, InvalidControl
from heimdex.ledger.cron import InvalidCron
from heimdex.ledger.errors import (
    IdempotencyConflict,
    IllegalTransition,
    InvalidBatchItem,
    InvalidParams,
    JobAlreadyFinished,
    JobNotFound,
    NotEligible,
    TimeoutAboveType,
    UnknownJobType,
)
from heimdex.ledger.schedules import InvalidScheduleName, ScheduleExists, ScheduleNotFound
from heimdex_api.auth import AuthenticationFailed, Forbidden

logger = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://heimdex.dev/problems/"

# Most specific first: the first matching class decides.
ERROR_STATUS: tuple[tuple[type[HeimdexError], int, str], ...] = (
    (AuthenticationFailed, 401, "unauthenticated"),
    (Forbidden, 403, "forbidden"),
    (JobNotFound, 404, "job-not-found"),
    (ControlNotFound, 404, "limit-or-pause-not-found"),
    (ControlConflict, 409, "already-paused"),
    (InvalidControl, 422, "invalid-limit-or-pause"),
    (ScheduleNotFound, 404, "schedule-not-found"),
    (ScheduleExists, 409, "schedule-exists"),
    (InvalidCron, 422, "invalid-cron"),
    (InvalidScheduleName, 422, "invalid-schedule-name"),
    (IdempotencyConflict, 409, "idempotency-conflict"),
    (JobAlreadyFinished, 409, "job-finished"),
    (NotEligible, 409, "not-eligible"),
    (IllegalTransition, 409, "illegal-transition"),
    (InvalidBatchItem, 422, "invalid-batch"),
    (UnknownJobType, 422, "unknown-job-type"),
    (InvalidParams, 422, "invalid-params"),
    (TimeoutAboveType, 422, "timeout-above-type"),
    # The database's own troubles: 503 and Retry-After, since each passes (or is fixed)
    # without the request changing; the type tells the operator where to look.
    (DatabaseDiskFull, 503, "database-disk-full"),
    (DatabaseOutOfResources, 503, "database-out-of-resources"),
    (DatabaseTooManyConnections, 503, "database-too-many-connections"),
    (DatabasePoolerError, 503, "database-pooler-error"),
    (DatabaseUnavailable, 503, "database-unavailable"),
    (HeimdexError, 400, "bad-request"),
)


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details",
    "required": ["type", "title", "status", "detail", "instance"],
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}},
        "checks": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": True,
}
WHEN = {
    400: "Bad request (a cursor this API did not issue, a bad header, a body that is not JSON)",
    401: "Missing, invalid or expired bearer token",
    403: "The token's role does not allow this (operator endpoints)",
    404: "No such job in the caller's organisation",
    409: "Conflict (idempotency key reused with another body, the job has finished, or its"
    " state does not allow the operator action)",
    408: "The request body did not arrive within the body timeout",
    413: "Request body over 256 KiB",
    422: "The request does not validate: a field out of its range, a timestamp outside the"
    " accepted window, text PostgreSQL cannot store (a NUL character, a lone surrogate)",
    503: "The database cannot do the work now; retry later. The type names the cause:"
    " database-unavailable (PostgreSQL unreachable or restarting), database-disk-full,"
    " database-out-of-resources (memory, limits), database-too-many-connections (no connection"
    " slot in PostgreSQL or the pooler), database-pooler-error (the pooler failed the"
    " statement)",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for error statuses: problem+json and its schema. Declaring
    422 here also replaces FastAPI's default (application/json) validation-error entry."""
    return {
        status: {
            "description": WHEN[status],
            "content": {MEDIA_TYPE: {"schema": PROBLEM_SCHEMA}},
        }
        for status in statuses
    }


class BadRequest(HeimdexError):
    """Input the API refuses before it reaches the ledger (a bad cursor, an oversized body)."""

    def __init__(self, message: str, status: int = 400, slug: str = "bad-request") -> None:
        super().__init__(message)
        self.status = status
        self.slug = slug


def problem(
    status: int,
    slug: str,
    detail: str,
    request: Request,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body = {
        "type": TYPE_BASE + slug,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **extensions,
    }
    headers = {**(headers or {}), **({"WWW-Authenticate": "Bearer"} if status == 401 else {})}
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def status_of(exc: HeimdexError) -> tuple[int, str]:
    if isinstance(exc, BadRequest):
        return exc.status, exc.slug
    for cls, status, slug in ERROR_STATUS:
        if isinstance(exc, cls):
            return status, slug
    return 500, "internal"  # unreachable: HeimdexError is in the table


async def _heimdex_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HeimdexError)
    if isinstance(exc, DatabaseProblem):
        return _database_problem(request, exc)
    status, slug = status_of(exc)
    return problem(status, slug, str(exc), request)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail, errors = flatten_validation_errors(exc.errors())
    return problem(422, "validation-error", detail, request, errors=errors)


HTTP_SLUGS = {
    404: "not-found",
    405: "method-not-allowed",
    408: "body-timeout",
    413: "body-too-large",
}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    response = problem(
        exc.status_code, HTTP_SLUGS.get(exc.status_code, "http-error"), str(exc.detail), request
    )
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        # RFC 9110: `Allow` lists every method of the path. Starlette names only the first
        # route that matched the path (GET /jobs and POST /jobs are two routes).
        response.headers["Allow"] = ", ".join(_allowed_methods(request))
    return response


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    routes = list(request.app.routes)
    while routes:
        route = routes.pop()
        included = getattr(route, "original_router", None)  # an include_router() wrapper
        if included is not None:
            routes.extend(included.routes)
            continue
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.url.path):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    found = database_problem(exc)
    if found is None:
        return await _unexpected(request, exc)
    return _database_problem(request, found)


def _database_problem(request: Request, exc: DatabaseProblem) -> JSONResponse:
    status, slug = status_of(exc)
    # One line, no traceback: an outage is expected operation. The server's reason goes to
    # the log only (it can name hosts and files); never the URL or the password.
    logger.warning(
        "database problem: %s",
        slug,
        extra={"action": "api." + slug.replace("-", "_"), "path": request.url.path,
               "reason": exc.reason},
    )  # fmt: skip
    return problem(status, slug, str(exc), request, headers={"Retry-After": "1"})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", extra={"action": "api.unhandled", "path": request.url.path})
    return problem(500, "internal", "internal error; it has been logged", request)


def install(app: FastAPI) -> None:
    app.add_exception_handler(HeimdexError, _heimdex_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(psycopg.Error, _database_error)
    app.add_exception_handler(Exception, _unexpected)
