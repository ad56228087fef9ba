"""The one check of every request's text (its query, the headers the API stores, its JSON or
form body) for strings PostgreSQL cannot store: a NUL character, a lone surrogate. Run as an
app-wide dependency, so no route and no field can be left out; a refusal is a 422 like any
other validation error. Timestamps are the `Timestamp` type's (schemas.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from heimdex.storable import Path, text_problem

# Headers whose value the API writes to the database.
STORED_HEADERS = ("Idempotency-Key",)
FORM = "application/x-www-form-urlencoded"


async def storable_input(request: Request) -> None:
    """Raise `RequestValidationError` naming the first unstorable string of the request."""
    found = (
        _first(("query",), request.query_params.multi_items())
        or _first(("header",), [(h, request.headers.get(h)) for h in STORED_HEADERS])
        or await _body(request)
    )
    if found is not None:
        loc, reason = found
        raise RequestValidationError(
            [{"type": "unstorable_text", "loc": loc, "msg": reason, "input": None}]
        )


def _first(root: Path, items: Any) -> tuple[Path, str] | None:
    for key, value in items:
        found = text_problem(key, root) or text_problem(value, (*root, key))
        if found is not None:
            return found
    return None


async def _body(request: Request) -> tuple[Path, str] | None:
    body = await request.body()
    if not body:
        return None
    if request.headers.get("content-type", "").startswith(FORM):
        # Read as the dashboard reads its forms: undecodable bytes become U+FFFD, a %00 a NUL.
        form = parse_qsl(body.decode(errors="replace"), keep_blank_values=True)
        return _first(("body",), form)
    # Only an escape (`\u0000`, `\ud800`) or non-ASCII bytes (a surrogate in raw UTF-8, which
    # Python's JSON decoder lets through, or a UTF-16 body) can carry one: the common body,
    # plain ASCII without escapes, is not parsed a second time nor walked.
    if body.isascii() and b"\\u" not in body and b"\x00" not in body:
        return None
    try:
        parsed = await request.json()
    except ValueError:  # not JSON: the route's own parsing answers for it, if it reads it
        return None
    return text_problem(parsed, ("body",))
