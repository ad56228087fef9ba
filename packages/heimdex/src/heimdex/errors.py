"""The project's one error type: everything a user should read as a message, not a traceback."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class HeimdexError(Exception):
    """An error whose message is complete and actionable on its own.

    Entrypoints (the CLI, Alembic's env.py, the API's exception handlers) print it as one line
    and exit non-zero; they never show a traceback for it.
    """


class DatabaseUnavailable(HeimdexError):
    """PostgreSQL could not be reached or refused the connection."""


def flatten_validation_errors(
    errors: Iterable[Mapping[str, Any]], root: str = ""
) -> tuple[str, list[dict[str, Any]]]:
    """pydantic's validation errors as one line (`a.b: msg; c: msg`, `root` naming an error on
    the whole value) and as a list of `{loc, msg, type}`: every place that reports them (the
    settings, job params, the API's 422s) reads the same."""
    flat = [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type")}
        for err in errors
    ]
    line = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or root}: {e['msg']}" for e in flat)
    return line, flat
