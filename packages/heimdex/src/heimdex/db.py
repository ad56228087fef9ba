"""Engine and session factories. Entrypoints build them; nothing connects at import."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg.abc import AdaptContext, Buffer
from psycopg.adapt import Loader
from psycopg.conninfo import make_conninfo
from psycopg.errors import InsufficientPrivilege, ReadOnlySqlTransaction, UndefinedTable
from psycopg.pq import Format
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, ExceptionContext
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from heimdex.errors import (
    DatabaseDiskFull,
    DatabaseOutOfResources,
    DatabasePoolerError,
    DatabaseProblem,
    DatabaseTooManyConnections,
    DatabaseUnavailable,
    HeimdexError,
)
from heimdex.settings import PoolMode, describe_url, normalize_url


def make_engine(url: URL | str, *, pool_mode: PoolMode = PoolMode.DIRECT, **kwargs: Any) -> Engine:
    """An engine for `url` (pinned to psycopg 3). Connects lazily.

    No pre-ping: it costs a round trip on every checkout of the hot paths. A connection broken
    by a restart fails its next statement instead, SQLAlchemy drops the pool's connections from
    before the failure, and the callers (API error mapping, worker loops) retry on a new one.

    Direct and session connections run with JIT off (`session_settings`) and prepare the hot
    statements on the server (unprepared, a one-job submit and a claim took about twice as long:
    bench/pooler_prepare.py). Behind a transaction pooler (`pool_mode`) a connection's next
    transaction may run on another server connection, which has neither: nothing is prepared
    (psycopg's `prepare_threshold=None` also overrides an explicit `prepare=True`) and no
    session setting is made (the claim carries its own, `LOCAL_SETTINGS`); every connection
    reads any timestamp, even one Python cannot hold (`clamp_timestamps`). A server that refuses
    writes counts as a lost connection (`read_only_is_disconnect`).
    """
    if pool_mode is PoolMode.TRANSACTION:
        kwargs["connect_args"] = {**kwargs.get("connect_args", {}), "prepare_threshold": None}
    engine = create_engine(normalize_url(url), **kwargs)
    if pool_mode is not PoolMode.TRANSACTION:
        event.listen(engine, "connect", session_settings)
    event.listen(engine, "connect", clamp_timestamps)
    event.listen(engine, "handle_error", read_only_is_disconnect)
    return engine


# PostgreSQL holds timestamps from 4713 BC to 294276 AD and +/-infinity; Python's datetime holds
# years 1 to 9999. The API refuses anything outside its own window, but a row written by other
# means (SQL, a restore) would otherwise fail every statement that reads it: a list of a
# thousand jobs, because of one. Such a value reads as the nearest instant Python holds.
LATEST = datetime.max.replace(tzinfo=UTC)
EARLIEST = datetime.min.replace(tzinfo=UTC)


def clamp_timestamps(dbapi_connection: Any, _record: object) -> None:
    """Registers, on this connection only, timestamptz loaders that read a value past year
    9999 (or `infinity`) as `LATEST` and one before year 1 (or `-infinity`) as `EARLIEST`."""
    adapters = dbapi_connection.adapters
    oid = adapters.types["timestamptz"].oid
    for fmt in (Format.TEXT, Format.BINARY):
        base = adapters.get_loader(oid, fmt)
        if base is not None:
            adapters.register_loader(oid, _clamping(base))


@functools.cache
def _clamping(base: type[Loader]) -> type[Loader]:
    class Clamping(Loader):
        format = base.format

        def __init__(self, oid: int, context: AdaptContext | None = None) -> None:
            super().__init__(oid, context)
            self._base = base(oid, context)

        def load(self, data: Buffer) -> datetime:
            try:
                value: datetime = self._base.load(data)
            except psycopg.DataError:
                clamped = _out_of_range(bytes(data), self.format)
                if clamped is None:
                    raise
                return clamped
            return value

    Clamping.__name__ = Clamping.__qualname__ = f"Clamping{base.__name__}"
    return Clamping


def _out_of_range(data: bytes, fmt: Format) -> datetime | None:
    if fmt is Format.BINARY:  # microseconds since 2000-01-01, +/-infinity at the int64 ends
        return EARLIEST if int.from_bytes(data, "big", signed=True) < 0 else LATEST
    if data == b"-infinity" or data.endswith(b" BC"):
        return EARLIEST
    year = data.partition(b"-")[0]
    if data == b"infinity" or (year.isdigit() and len(year) > 4):
        return LATEST
    return None


def read_only_is_disconnect(context: ExceptionContext) -> None:
    """SQLSTATE 25006 (read_only_sql_transaction) counts as a disconnect: SQLAlchemy then drops
    the connection and every pooled one from before it.

    Heimdex only talks to the primary. A connection that meets a read-only server is left over
    from a failover (a demoted primary that kept its sessions, a standby reached without
    `target_session_attrs=read-write`); kept in the pool, it would fail every write it serves.
    A new connection from a multi-host URL with `target_session_attrs=read-write` finds the
    new primary, and the callers already retry a disconnect on one (503 + Retry-After in the
    API, backoff in the worker)."""
    if isinstance(context.original_exception, ReadOnlySqlTransaction):
        context.is_disconnect = True


def libpq_conninfo(url: URL) -> str:
    """`url` as a libpq connection string, for a plain psycopg connection (LISTEN): every host
    of a multi-host URL with its port, and the URL's options such as `target_session_attrs`
    (rendering the URL would pass `host=h:p` entries libpq cannot read)."""
    url = normalize_url(url)
    _, kwargs = url.get_dialect()().create_connect_args(url)
    return make_conninfo("", **{k: v for k, v in kwargs.items() if isinstance(v, str | int)})


def server_address(connection: Connection) -> str:
    """`host:port` of the server `connection` reached (of a multi-host URL, the one libpq
    kept)."""
    info = connection.connection.dbapi_connection.info  # type: ignore[union-attr]
    return f"{info.host}:{info.port}"


# PostgreSQL compiles a statement whose estimated cost passes `jit_above_cost` (100,000 by
# default) to machine code, on every execution: a prepared statement keeps its plan, not the
# compiled code. The claim's estimate grows with the queue (about 0.8 per queued job), so a
# queue past ~130k jobs made every claim spend 25-30 ms compiling a statement that runs in
# 1-2 ms (150k queued: 49 ms a claim, 27 ms of it JIT). Heimdex's statements are all short:
# none is the long analytic query JIT pays off for.
SESSION_SETTINGS = ("SET jit = off",)
# The same, for one transaction: through a transaction pooler a session setting reaches only
# the server connection it ran on, and the next transaction may run on another.
LOCAL_SETTINGS = ("SET LOCAL jit = off",)


def session_settings(dbapi_connection: Any, _record: object) -> None:
    """Applied once to each new direct or session-pooled connection, before the pool hands it
    out."""
    with dbapi_connection.cursor() as cursor:
        for statement in SESSION_SETTINGS:
            cursor.execute(statement)
    dbapi_connection.commit()


def rows_with_local_settings(
    driver: psycopg.Connection[Any], sql: str, params: Mapping[str, Any]
) -> list[Any]:
    """The rows of `sql` run after `LOCAL_SETTINGS`, on an autocommit connection that prepares
    nothing (a transaction pooler's): one simple-protocol message, so one implicit transaction
    (SET LOCAL holds for the statement and ends with it) and one round trip, where BEGIN, SET,
    the statement and COMMIT would be four. The parameters are bound client-side, which costs
    nothing a server that prepares nothing would not do anyway."""
    with psycopg.ClientCursor(driver) as cursor:
        cursor.execute("; ".join((*LOCAL_SETTINGS, sql)), params)
        rows: list[Any] = []
        while True:
            if cursor.description is not None:
                rows = cursor.fetchall()
            if not cursor.nextset():
                return rows


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def redact(message: str, password: str | None) -> str:
    """`message` without the password, its URL-encoded form or any piece of it longer than
    two characters (the pieces between `/`, `@`, `:` and `%` a misparsed URL could show)."""
    if not password:
        return message
    pieces = {password, quote(password, safe=""), quote(password)}
    pieces.update(p for p in re.split(r"[/@:%]", password) if len(p) > 2)
    for piece in sorted(pieces, key=len, reverse=True):
        message = message.replace(piece, "***")
    return message


# psycopg opens a failed connection's reason with where it tried, which the message says already.
_CONNECT_PREAMBLE = re.compile(
    r"^(connection failed: )?(connection to server (at|on) .*? failed: )?(FATAL: +)?"
)


def connection_error(url: URL, exc: BaseException) -> DatabaseProblem:
    """The one formatter for a failed connection: host, port, database, role and the driver's
    first line of reason; never the URL, the user's password or any part of it. Its type names
    the cause (`database_problem`): out of connection slots, the pooler, or unreachable."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    first = _CONNECT_PREAMBLE.sub("", reason[0]) if reason else type(exc).__name__
    where = describe_url(url) + (f" as {url.username}" if url.username else "")
    password = None if url.password is None else str(url.password)
    kind = type(database_problem(exc) or DatabaseUnavailable(""))
    message = redact(f"cannot connect to PostgreSQL at {where}: {first}", password)
    return kind(message, message)


def _first_line(exc: BaseException) -> str:
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return reason[0] if reason else type(exc).__name__


# What an operator reads for each cause (the API's problem detail: the server's own message,
# which can name files and hosts, goes to the log only).
_PROBLEMS: dict[type[DatabaseProblem], str] = {
    DatabaseDiskFull: "PostgreSQL's disk is full; nothing was written. Free space or grow the"
    " volume (or the tablespace), then retry",
    DatabaseOutOfResources: "PostgreSQL is out of memory or at a configured limit; retry later,"
    " and check the server's memory and limits",
    DatabaseTooManyConnections: "no database connection slot is free (PostgreSQL's"
    " max_connections or the pooler's max_client_conn); retry later, and raise the limit or"
    " lower the API's and workers' pool sizes",
    DatabasePoolerError: "the connection pooler in front of PostgreSQL failed the statement;"
    " behind a transaction pooler set HEIMDEX_DB_POOL_MODE=transaction, and check the pooler's"
    " log",
    DatabaseUnavailable: "PostgreSQL is unreachable or restarting; retry later",
}
# Connection-time refusals carry no SQLSTATE through libpq: their text is all there is.
_NO_SLOT_TEXT = (
    "too many clients already",  # PostgreSQL, 53300
    "remaining connection slots are reserved",  # PostgreSQL, 53300
    "no more connections allowed",  # pgbouncer's max_client_conn
    "too many connections for role",  # PostgreSQL, a role's CONNECTION LIMIT
    "too many connections for database",
)
_POOLER_TEXT = ("pgbouncer", "query_wait_timeout", "server conn crashed", "server login has been")


def database_problem(exc: BaseException) -> DatabaseProblem | None:
    """The cause of a failure of the database rather than of the statement, as the one
    `DatabaseProblem` subclass that names it, with what an operator should do; None for a
    statement's own error (a constraint, a bug), which is no outage.

    By SQLSTATE where the server sent one: 53100 disk full, 53300 too many connections, the
    rest of class 53 out of resources, 26000/42P05 a prepared statement lost or doubled by a
    transaction pooler, 08P01 pgbouncer's own errors; then by the connection refusal's text;
    then any failure of the connection itself is PostgreSQL unreachable."""
    driver = exc
    while isinstance(driver, DBAPIError) and driver.orig is not None:
        driver = driver.orig
    sqlstate = getattr(driver, "sqlstate", None) or ""
    text_ = str(driver).lower()
    kind: type[DatabaseProblem] | None = None
    if sqlstate == "53100":
        kind = DatabaseDiskFull
    elif sqlstate == "53300" or any(t in text_ for t in _NO_SLOT_TEXT):
        kind = DatabaseTooManyConnections
    elif sqlstate.startswith("53"):
        kind = DatabaseOutOfResources
    elif sqlstate in ("26000", "42P05", "08P01") or any(t in text_ for t in _POOLER_TEXT):
        kind = DatabasePoolerError
    elif _is_disconnect(exc, driver):
        kind = DatabaseUnavailable
    if kind is None:
        return None
    return kind(_PROBLEMS[kind], _first_line(driver))


def _is_disconnect(exc: BaseException, driver: BaseException) -> bool:
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(driver, psycopg.OperationalError | psycopg.InterfaceError) or isinstance(
        exc, OperationalError
    )


def missing_privilege(exc: BaseException, role: str | None) -> str | None:
    """One line naming the role, the object and the grant it lacks, if `exc` (or what it
    wraps) is PostgreSQL's insufficient_privilege; None otherwise."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, InsufficientPrivilege):
        seen = getattr(seen, "orig", None) or seen.__cause__ or seen.__context__
    if seen is None:
        return None
    primary = seen.diag.message_primary or str(seen).splitlines()[0]
    who = role or "the connecting role"
    match = re.search(r"permission denied for (schema|table|sequence|database) (\S+)", primary)
    if match is None:
        return f"role {who}: {primary}; run migrations as the schema owner"
    kind, name = match.groups()
    grant = {
        "schema": f"GRANT USAGE, CREATE ON SCHEMA {name} TO {who}",
        "database": f"GRANT CONNECT, CREATE ON DATABASE {name} TO {who}",
    }.get(kind, f"GRANT ALL ON {kind.upper()} {name} TO {who} (or run as its owner)")
    return f"role {who}: {primary}; missing grant: {grant}"


def database_error(exc: BaseException, url: URL) -> HeimdexError | None:
    """One line for a database a command cannot use: unreachable, refusing the login, missing,
    without the schema, or refusing a privilege; None for anything else (a defect, which keeps
    its traceback). `url` is the database the command used; its password is never shown."""
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig
    # psycopg raises the base class, without a SQLSTATE, when the connection cannot be opened.
    if type(orig) is psycopg.OperationalError:
        return connection_error(url, exc)
    where = f"PostgreSQL at {describe_url(url)}"
    password = None if url.password is None else str(url.password)
    if (line := missing_privilege(exc, url.username)) is not None:
        return HeimdexError(redact(f"{where}: {line}", password))
    first = str(orig).strip().splitlines()[0] if orig is not None and str(orig).strip() else ""
    if isinstance(orig, UndefinedTable):
        return HeimdexError(
            f"{where} has no Heimdex schema ({first}): run `heimdex db upgrade` against it"
        )
    # Shut down, timed out, canceled meanwhile; a full disk, no connection slot, the pooler.
    found = database_problem(exc)
    if found is None:
        return None
    message = redact(f"{where}: {first or type(orig).__name__}", password)
    return type(found)(message, message)


def check_connection(engine: Engine) -> None:
    """Raise `DatabaseUnavailable` with a readable reason unless `SELECT 1` succeeds."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        raise connection_error(engine.url, exc) from None


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error.

    The caller owns this: repositories inside only add, flush and query.
    """
    with factory() as session, session.begin():
        yield session
