"""The one settings object every Heimdex process reads once at its entrypoint."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from functools import cached_property
from typing import Any, Literal
from urllib.parse import unquote

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url

from heimdex.errors import HeimdexError, flatten_validation_errors
from heimdex.logs import LogFormat
from heimdex.models import JobStatus

DRIVER = "postgresql+psycopg"
# At least 32 bytes, as RFC 7518 asks of an HS256 key (PyJWT warns below that).
PLACEHOLDER_JWT_SECRET = "local-dev-secret-change-me-not-for-prod"  # noqa: S105 - local only
# Earlier placeholders, refused outside local too.
_OLD_PLACEHOLDERS = ("local-dev-secret-change-me",)


SUCCEEDED_GROUP = (JobStatus.SUCCEEDED, JobStatus.CANCELED)
FAILED_GROUP = (JobStatus.FAILED, JobStatus.DEAD_LETTER)
_AGE = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)?\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_OFF = ("", "off", "never", "none")
MAX_WORKER_CONCURRENCY = 1000
# One connection each for the LISTEN, the keeper, the outcome writer, claims, the attempts'
# writes, the handlers' own (`ctx.connect()`), and what uses the engine directly (metrics, a
# retention slice).
MIN_WORKER_DB_CONNECTIONS = 7


def parse_age(value: str) -> timedelta | None:
    """`30d`, `12h`, `90m`, `3600s` (or `3600`), `2w`; `off`/`never` is None (keep forever)."""
    raw = value.strip().lower()
    if raw in _OFF:
        return None
    match = _AGE.match(raw)
    if match is None or int(match.group(1)) <= 0:
        raise HeimdexError(
            f"a retention age looks like 30d, 12h, 90m, 3600s or 2w (or 'off'), not {value!r}"
        )
    return timedelta(**{_UNITS[match.group(2) or "s"]: int(match.group(1))})


def format_age(age: timedelta | None) -> str:
    if age is None:
        return "off"
    seconds = int(age.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class Ages:
    """How long finished jobs are kept: `succeeded` for succeeded and canceled jobs, `failed`
    for failed and dead-lettered ones; None keeps them forever."""

    succeeded: timedelta | None
    failed: timedelta | None

    def for_status(self, status: JobStatus) -> timedelta | None:
        return self.succeeded if status in SUCCEEDED_GROUP else self.failed


@dataclass(frozen=True)
class RetentionPolicy:
    """The deployment's ages, and orgs that keep their jobs for other ages."""

    default: Ages
    orgs: Mapping[uuid.UUID, Ages] = field(default_factory=dict)

    @property
    def deletes_anything(self) -> bool:
        """False when every age is `off`: a pass would delete nothing."""
        ages = [self.default, *self.orgs.values()]
        return any(a.succeeded is not None or a.failed is not None for a in ages)

    @classmethod
    def parse(cls, succeeded: str, failed: str, orgs: str = "") -> RetentionPolicy:
        """From the settings' strings; `orgs` is `ORG=SUCCEEDED/FAILED` entries, comma-separated
        (`0b5d...=90d/1y`-style ages as in `parse_age`; one age alone applies to both)."""
        overrides: dict[uuid.UUID, Ages] = {}
        for entry in (e.strip() for e in orgs.split(",")):
            if not entry:
                continue
            org, sep, ages = entry.partition("=")
            try:
                org_id = uuid.UUID(org.strip())
            except ValueError:
                raise HeimdexError(
                    f"a per-org retention looks like ORG_UUID=30d/90d, not {entry!r}"
                ) from None
            if not sep:
                raise HeimdexError(
                    f"a per-org retention looks like ORG_UUID=30d/90d, not {entry!r}"
                )
            first, _, second = ages.partition("/")
            overrides[org_id] = Ages(parse_age(first), parse_age(second or first))
        return cls(Ages(parse_age(succeeded), parse_age(failed)), overrides)


class PoolMode(StrEnum):
    """What sits between Heimdex and PostgreSQL on `DATABASE_URL` (`HEIMDEX_DB_POOL_MODE`).

    `transaction`: a pooler that hands each transaction any server connection (pgbouncer's
    `pool_mode = transaction`, Supabase's pooler on port 6543). No server-side prepared
    statements, no session settings, no LISTEN and no session advisory lock on it.
    `session`: a pooler that gives a client one server connection for its whole session
    (Supabase's pooler on port 5432); `direct`: PostgreSQL itself. Both keep session state.
    """

    AUTO = "auto"
    TRANSACTION = "transaction"
    SESSION = "session"
    DIRECT = "direct"


# Supabase's shared pooler: port 6543 is its transaction mode and 5432 its session mode, on the
# same `*.pooler.supabase.com` host. Only these are read from a URL: a self-hosted pgbouncer's
# port says nothing about its pool_mode, so it is declared with HEIMDEX_DB_POOL_MODE.
SUPABASE_TRANSACTION_PORT = 6543
SUPABASE_POOLER_HOST = ".pooler.supabase.com"


def detect_pool_mode(url: URL) -> PoolMode:
    """The pool mode a URL shows by itself: Supabase's pooler port 6543 is a transaction
    pooler, its pooler host on another port a session one; anything else is taken as direct."""
    if url.port == SUPABASE_TRANSACTION_PORT:
        return PoolMode.TRANSACTION
    if (url.host or "").lower().endswith(SUPABASE_POOLER_HOST):
        return PoolMode.SESSION
    return PoolMode.DIRECT


class Environment(StrEnum):
    LOCAL = "local"
    DEV = "dev"
    STAGING = "staging"
    PROD = "prod"


class Settings(BaseSettings):
    """Configuration from the environment (and an optional `.env` file).

    The database is addressed either by `DATABASE_URL` or by the libpq variables
    (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`); `DATABASE_URL` wins when set.
    """

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    database_url: SecretStr | None = Field(default=None, validation_alias="DATABASE_URL")
    pghost: str = Field(default="localhost", validation_alias="PGHOST")
    pgport: int = Field(default=5432, validation_alias="PGPORT")
    pguser: str = Field(default="postgres", validation_alias="PGUSER")
    pgpassword: SecretStr | None = Field(default=None, validation_alias="PGPASSWORD")
    pgdatabase: str = Field(default="heimdex", validation_alias="PGDATABASE")

    # auto: read from the URL (`detect_pool_mode`): Supabase's pooler port 6543 is transaction
    # mode. Declare `transaction` for any other transaction pooler (pgbouncer, Supavisor, RDS
    # Proxy): Heimdex then prepares no statement on the server and keeps no session state.
    db_pool_mode: PoolMode = Field(default=PoolMode.AUTO, validation_alias="HEIMDEX_DB_POOL_MODE")
    # A direct (or session-pooled) URL for what needs a session of its own when DATABASE_URL
    # is a transaction pooler's: the workers' LISTEN (without it they poll) and retention's
    # advisory lock, and `heimdex db` (which refuses a transaction pooler otherwise).
    session_database_url: SecretStr | None = Field(
        default=None, validation_alias="HEIMDEX_SESSION_DATABASE_URL"
    )
    # A streaming replica for reads that accept lag (operator lists, stats, failures, the
    # queue gauges); unset: everything reads the primary. Past the lag bound, or while the
    # replica does not answer, those reads go to the primary.
    read_database_url: SecretStr | None = Field(
        default=None, validation_alias="HEIMDEX_READ_DATABASE_URL"
    )
    read_max_lag_seconds: float = Field(
        default=30.0, gt=0, validation_alias="HEIMDEX_READ_MAX_LAG_SECONDS"
    )

    jwt_secret: SecretStr = Field(
        default=SecretStr(PLACEHOLDER_JWT_SECRET),
        validation_alias=AliasChoices("HEIMDEX_JWT_SECRET"),
    )
    env: Environment = Field(default=Environment.LOCAL, validation_alias="HEIMDEX_ENV")
    # auto: aligned, coloured lines on a terminal, JSON lines otherwise.
    log_format: LogFormat = Field(default=LogFormat.AUTO, validation_alias="HEIMDEX_LOG_FORMAT")
    # debug also shows third-party chatter (uvicorn access lines, alembic's context lines).
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", validation_alias="HEIMDEX_LOG_LEVEL"
    )
    # https://no-color.org: any non-empty value turns colour off on a terminal too.
    no_color: str = Field(default="", validation_alias="NO_COLOR")

    # The job runtime. Seconds throughout; tests shrink them to run in well under a second.
    api_host: str = Field(default="127.0.0.1", validation_alias="HEIMDEX_API_HOST")
    api_port: int = Field(default=8000, validation_alias="HEIMDEX_API_PORT")
    # How long the API waits for a request's whole body: a client that stops sending mid-body
    # is answered 408 and disconnected, rather than holding a connection and a task.
    body_timeout_seconds: float = Field(
        default=5.0, gt=0, validation_alias="HEIMDEX_BODY_TIMEOUT_SECONDS"
    )
    worker_concurrency: int = Field(
        default=4, ge=1, le=MAX_WORKER_CONCURRENCY, validation_alias="HEIMDEX_WORKER_CONCURRENCY"
    )
    # A slot is a thread, not a connection: a worker's connections are this many whatever its
    # concurrency (its LISTEN connection included; heimdex_worker.db.Budget spends them).
    worker_db_connections: int = Field(
        default=10,
        ge=MIN_WORKER_DB_CONNECTIONS,
        le=100,
        validation_alias="HEIMDEX_WORKER_DB_CONNECTIONS",
    )
    claim_batch: int = Field(default=4, ge=1, le=1000, validation_alias="HEIMDEX_CLAIM_BATCH")
    # The queues a worker claims, comma-separated (empty: every queue of its job types).
    worker_queues: str = Field(default="", validation_alias="HEIMDEX_WORKER_QUEUES")
    # How often a worker's keeper recounts the caps' slots from the job rows (a count left
    # wrong heals then) and which capped scopes held jobs wait for.
    limits_reconcile_seconds: float = Field(
        default=30.0, gt=0, validation_alias="HEIMDEX_LIMITS_RECONCILE_SECONDS"
    )
    poll_interval_seconds: float = Field(
        default=1.0, gt=0, validation_alias="HEIMDEX_POLL_INTERVAL_SECONDS"
    )
    listen: bool = Field(default=True, validation_alias="HEIMDEX_LISTEN")
    job_modules: str = Field(default="", validation_alias="HEIMDEX_JOB_MODULES")
    lease_seconds: float = Field(default=30.0, gt=0, validation_alias="HEIMDEX_LEASE_SECONDS")
    heartbeat_seconds: float = Field(
        default=10.0, gt=0, validation_alias="HEIMDEX_HEARTBEAT_SECONDS"
    )
    reaper_interval_seconds: float = Field(
        default=5.0, gt=0, validation_alias="HEIMDEX_REAPER_INTERVAL_SECONDS"
    )
    backoff_base_seconds: float = Field(
        default=2.0, ge=0, validation_alias="HEIMDEX_BACKOFF_BASE_SECONDS"
    )
    backoff_max_seconds: float = Field(
        default=300.0, ge=0, validation_alias="HEIMDEX_BACKOFF_MAX_SECONDS"
    )
    shutdown_grace_seconds: float = Field(
        default=30.0, ge=0, validation_alias="HEIMDEX_SHUTDOWN_GRACE_SECONDS"
    )
    # After an attempt's execution timeout: how long its handler and child processes get to
    # stop before the children are killed and the handler is declared stuck.
    timeout_grace_seconds: float = Field(
        default=30.0, ge=0, validation_alias="HEIMDEX_TIMEOUT_GRACE_SECONDS"
    )
    worker_metrics_port: int = Field(
        default=0, ge=0, validation_alias="HEIMDEX_WORKER_METRICS_PORT"
    )
    dev_port: int = Field(default=0, ge=0, validation_alias="HEIMDEX_DEV_PG_PORT")

    # Retention: finished jobs (and their events) older than these ages are deleted by the
    # workers' keeper. Ages like 30d, 12h, 90m; `off` keeps them forever.
    retention_succeeded: str = Field(default="14d", validation_alias="HEIMDEX_RETENTION_SUCCEEDED")
    retention_failed: str = Field(default="30d", validation_alias="HEIMDEX_RETENTION_FAILED")
    # ORG_UUID=SUCCEEDED/FAILED entries, comma-separated: orgs with ages of their own.
    retention_orgs: str = Field(default="", validation_alias="HEIMDEX_RETENTION_ORGS")
    retention_interval_seconds: float = Field(
        default=300.0, gt=0, validation_alias="HEIMDEX_RETENTION_INTERVAL_SECONDS"
    )
    retention_batch: int = Field(
        default=100, ge=1, le=10000, validation_alias="HEIMDEX_RETENTION_BATCH"
    )
    # After each batch the pass sleeps this many times the batch's duration (1, the default: busy
    # at most half the time); 0 runs the batches back to back.
    retention_pause_factor: float = Field(
        default=1.0, ge=0, le=100, validation_alias="HEIMDEX_RETENTION_PAUSE_FACTOR"
    )
    # A JSONL file each deleted job (with its events) is appended to first; empty: no archive.
    retention_archive: str = Field(default="", validation_alias="HEIMDEX_RETENTION_ARCHIVE")

    @field_validator("log_level", "log_format", "db_pool_mode", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _refuse_placeholder_secret(self) -> Settings:
        if self.env is not Environment.LOCAL and (
            self.jwt_secret.get_secret_value() in ("", PLACEHOLDER_JWT_SECRET, *_OLD_PLACEHOLDERS)
        ):
            raise ValueError(
                f"HEIMDEX_JWT_SECRET must be set to a real secret when HEIMDEX_ENV={self.env.value}"
            )
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                "HEIMDEX_HEARTBEAT_SECONDS must be shorter than HEIMDEX_LEASE_SECONDS, "
                "or every lease expires before its renewal"
            )
        self.retention_policy  # noqa: B018 - an unreadable policy fails at startup, not later
        session = self.session_url
        if (
            self.session_database_url is not None
            and session is not None
            and (self.pool_mode_of(session) is PoolMode.TRANSACTION)
        ):
            raise ValueError(
                "HEIMDEX_SESSION_DATABASE_URL must be a direct or session-mode URL, not a "
                "transaction pooler's (port 6543 is Supabase's transaction pooler; use 5432)"
            )
        return self

    @cached_property
    def retention_policy(self) -> RetentionPolicy:
        """The retention ages of `HEIMDEX_RETENTION_*`, parsed."""
        try:
            return RetentionPolicy.parse(
                self.retention_succeeded, self.retention_failed, self.retention_orgs
            )
        except HeimdexError as exc:
            raise ValueError(str(exc)) from None

    @property
    def log_options(self) -> dict[str, Any]:
        """`configure_logging` keywords from these settings (format, level, colour)."""
        return {"fmt": self.log_format, "level": self.log_level, "color": not self.no_color}

    @property
    def job_module_specs(self) -> list[str]:
        """`HEIMDEX_JOB_MODULES` split: extra `module:attribute` job-type collections."""
        return [spec.strip() for spec in self.job_modules.split(",") if spec.strip()]

    @cached_property
    def sqlalchemy_url(self) -> URL:
        """The database URL, built with `URL.create` so any password character is safe."""
        if self.database_url is not None:
            return normalize_url(self.database_url.get_secret_value())
        return URL.create(
            DRIVER,
            username=self.pguser,
            password=self.pgpassword.get_secret_value() if self.pgpassword else None,
            host=self.pghost,
            port=self.pgport,
            database=self.pgdatabase,
        )

    @property
    def pool_mode(self) -> PoolMode:
        """`HEIMDEX_DB_POOL_MODE` of `DATABASE_URL`, or what the URL shows when it is `auto`."""
        return self.pool_mode_of(self.sqlalchemy_url)

    def pool_mode_of(self, url: URL) -> PoolMode:
        """The pool mode of `url`: the declared one for `DATABASE_URL`, else the URL's own."""
        if self.db_pool_mode is not PoolMode.AUTO and url == self.sqlalchemy_url:
            return self.db_pool_mode
        return detect_pool_mode(url)

    @cached_property
    def session_url(self) -> URL | None:
        """A URL on which a session keeps its state (LISTEN, session advisory locks):
        `HEIMDEX_SESSION_DATABASE_URL` when set, `DATABASE_URL` unless it is a transaction
        pooler's, else None."""
        if self.session_database_url is not None:
            return normalize_url(self.session_database_url.get_secret_value())
        if self.pool_mode is PoolMode.TRANSACTION:
            return None
        return self.sqlalchemy_url

    @cached_property
    def read_sqlalchemy_url(self) -> URL | None:
        """The replica's URL (`HEIMDEX_READ_DATABASE_URL`), or None."""
        if self.read_database_url is None or not self.read_database_url.get_secret_value():
            return None
        return normalize_url(self.read_database_url.get_secret_value())


def normalize_url(url: str | URL) -> URL:
    """Parse a PostgreSQL URL and pin the psycopg 3 driver."""
    try:
        parsed = _parse(url) if isinstance(url, str) else url
    except Exception as exc:  # sqlalchemy raises ArgumentError; never echo the URL (password)
        raise HeimdexError("DATABASE_URL is not a valid URL (postgresql://user@host/db)") from exc
    if parsed.get_backend_name() != "postgresql":
        raise HeimdexError(
            f"DATABASE_URL must point at PostgreSQL, not {parsed.get_backend_name()!r}"
        )
    return parsed.set(drivername=DRIVER)


def _parse(raw: str) -> URL:
    """`make_url`, except that the credentials end at the LAST `@` of the authority: a raw
    password may hold `@`, `/` or `:` (make_url would take the rest of it for the host and
    print it in every connection error). libpq's multi-host form, `host1:5432,host2:5432`,
    becomes SQLAlchemy's: one `host=host:port` query entry per host, in order."""
    scheme, sep, rest = raw.partition("://")
    at = rest.rfind("@")
    if not sep:
        return make_url(raw)
    userinfo, location = (rest[:at], rest[at + 1 :]) if at >= 0 else ("", rest)
    end = min((i for i in (location.find("/"), location.find("?")) if i >= 0), default=None)
    netloc, tail = location[:end], location[end:] if end is not None else ""
    if "," in netloc:
        url = make_url(f"{scheme}://{tail if tail.startswith('/') else '/' + tail}")
        url = url.update_query_pairs([("host", h) for h in netloc.split(",") if h], append=True)
    else:
        url = make_url(f"{scheme}://{location}")
    if at < 0:
        return url
    user, has_password, password = userinfo.partition(":")
    return url.set(
        username=unquote(user) or None, password=unquote(password) if has_password else None
    )


def url_hosts(url: URL) -> list[str]:
    """Every `host:port` `url` names, in the order libpq tries them (one unless multi-host)."""
    hosts = url.query.get("host")
    if hosts:
        entries = [hosts] if isinstance(hosts, str) else list(hosts)
        return [h if ":" in h else f"{h}:{url.port or 5432}" for h in entries]
    return [f"{url.host or 'localhost'}:{url.port or 5432}"]


def describe_url(url: URL) -> str:
    """`host:port/database` (`host1:port,host2:port/database` for a multi-host URL) for
    messages; never includes the password."""
    return f"{','.join(url_hosts(url))}/{url.database or ''}"


def log_options_or_defaults() -> dict[str, Any]:
    """`configure_logging` keywords from the environment's settings, or the defaults when the
    settings do not load (a prod env without its secret): a command that needs none of them,
    a migration, must not fail on that."""
    try:
        return load_settings().log_options
    except HeimdexError:
        return {"fmt": LogFormat.AUTO, "level": "info"}


def load_settings() -> Settings:
    """Read the settings, turning validation errors into one readable `HeimdexError`."""
    try:
        return Settings()
    except ValidationError as exc:
        problems, _ = flatten_validation_errors(exc.errors(), root="settings")
        raise HeimdexError(f"invalid settings: {problems}") from None
