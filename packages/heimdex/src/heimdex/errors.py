"""The project's one error type: everything a user should read as a message, not a traceback."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class HeimdexError(Exception):
    """An error whose message is complete and actionable on its own.

    Entrypoints (the CLI, Alembic's env.py, the API's exception handlers) print it as one line
    and exit non-zero; they never show a traceback for it.
    """


class DatabaseProblem(HeimdexError):
    """PostgreSQL (or a pooler in front of it) could not do the work, for a reason outside the
    request: each subclass names one cause and where an operator should look
    (`heimdex.db.database_problem` decides which). `reason` is the server's or the driver's own
    first line, for the log: it can name hosts and files, so API clients are not shown it."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class DatabaseUnavailable(DatabaseProblem):
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


class DatabaseDiskFull(DatabaseProblem):
    """PostgreSQL could not write: its disk (or a tablespace's) is full (SQLSTATE 53100)."""


class DatabaseOutOfResources(DatabaseProblem):
    """PostgreSQL ran out of memory or hit a configured limit (SQLSTATE class 53, but for a
    full disk and the connection limit)."""


class DatabaseTooManyConnections(DatabaseProblem):
    """No connection slot left: PostgreSQL's `max_connections` (SQLSTATE 53300) or a pooler's
    client limit (pgbouncer's `max_client_conn`)."""


class DatabasePoolerError(DatabaseProblem):
    """The connection pooler in front of PostgreSQL failed the statement: its own error, or a
    session feature it does not carry (a server-side prepared statement handed to another
    client: SQLSTATE 26000 or 42P05)."""
