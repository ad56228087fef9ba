"""The ledger's tables as SQLAlchemy models: the schema Alembic's head must produce exactly."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Sequence,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ENUM, JSONB, TIMESTAMP, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# One convention for every constraint and index. Revisions pass final names through `op.f()`
# so the convention is never applied twice (upstream produced `ck_job__ck_job_status`).
NAMING_CONVENTION: dict[str, str] = {
    "ix": "idx_%(table_name)s__%(column_0_N_name)s",
    "uq": "uq_%(table_name)s__%(column_0_N_name)s",
    "ck": "ck_%(table_name)s__%(constraint_name)s",
    "fk": "fk_%(table_name)s__%(column_0_N_name)s__%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# The queue of a job type that names none, and of every job from before queues.
DEFAULT_QUEUE = "default"
QUEUE_MAX = 100


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    DEAD_LETTER = "dead_letter"


TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.DEAD_LETTER}
)


class BackoffPolicy(StrEnum):
    NONE = "none"
    FIXED = "fixed"
    EXP = "exp"


def _values(enum: type[StrEnum]) -> list[str]:
    return [member.value for member in enum]


job_status_type = ENUM(JobStatus, name="job_status", values_callable=_values, create_type=False)
backoff_policy_type = ENUM(
    BackoffPolicy, name="job_backoff_policy", values_callable=_values, create_type=False
)

ERROR_CODE_MAX = 64
ERROR_MESSAGE_MAX = 2048
STAGE_MAX = 50


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Job(Base):
    # The history also sets fillfactor 75 (revision a9c4e2f7b1d3: room for heartbeats' HOT
    # updates), which a model cannot say.
    __tablename__ = "job"
    __table_args__ = (
        Index(
            "idx_job__org_id_idempotency_key",
            "org_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        Index("idx_job__org_id_created_at_desc", "org_id", text("created_at DESC")),
        Index(None, "status", "created_at"),
        # The API's list filtered by status: newest first, from the keyset cursor on.
        Index(None, "org_id", "status", "created_at", "id"),
        # Retention walks each finished status oldest first.
        Index(
            None,
            "status",
            "finished_at",
            "id",
            postgresql_where=text("status IN ('succeeded', 'failed', 'canceled', 'dead_letter')"),
        ),
        # The queue (partial indexes: they hold queued jobs only, so they stay small on a large
        # ledger). The claim reads placed jobs in claim order; a submit finds the org's last
        # turn at a priority; the claim places the jobs that came due unplaced (see
        # repository/worker.py, THE CLAIM).
        Index(
            "idx_job__claim_queue",
            "queue",
            text("priority DESC"),
            "turn",
            "run_at",
            postgresql_where=text("status = 'queued' AND turn IS NOT NULL"),
        ),
        Index(
            "idx_job__org_queue_turn",
            "org_id",
            "queue",
            "priority",
            "turn",
            "id",
            postgresql_where=text("status = 'queued' AND turn IS NOT NULL"),
        ),
        Index(
            "idx_job__due",
            "run_at",
            postgresql_where=text("status = 'queued' AND turn IS NULL AND NOT held"),
        ),
        # Held jobs of a scope, oldest first: for the placer when the scope has room, and for
        # resume.
        Index(
            "idx_job__held_org",
            "org_id",
            "run_at",
            postgresql_where=text("status = 'queued' AND held"),
        ),
        Index(
            "idx_job__held_queue",
            "queue",
            "run_at",
            postgresql_where=text("status = 'queued' AND held"),
        ),
        CheckConstraint(
            "(status IN ('succeeded', 'failed', 'canceled', 'dead_letter')"
            " AND finished_at IS NOT NULL)"
            " OR (status IN ('queued', 'running') AND finished_at IS NULL)",
            name="status_finished_at_consistency",
        ),
        {"comment": "Durable ledger for asynchronous jobs with retry and idempotency support"},
    )

    id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True),
        primary_key=True,
        server_default=text("gen_random_uuid()"),
        comment="Globally unique job identifier",
    )
    org_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), comment="Organization/tenant identifier for RLS"
    )
    type: Mapped[str] = mapped_column(
        String(100), comment="Job type discriminator (e.g., 'mock_process', 'drive_ingest')"
    )
    status: Mapped[JobStatus] = mapped_column(
        job_status_type, server_default=text("'queued'"), comment="Current job state"
    )
    attempt: Mapped[int] = mapped_column(
        Integer,
        server_default=text("0"),
        comment="Retry attempt counter (0 = first attempt)",
    )
    max_attempts: Mapped[int] = mapped_column(
        Integer,
        server_default=text("5"),
        comment="Maximum retry attempts before dead-lettering",
    )
    backoff_policy: Mapped[BackoffPolicy] = mapped_column(
        backoff_policy_type,
        server_default=text("'exp'"),
        comment="Backoff policy for retry scheduling",
    )
    priority: Mapped[int] = mapped_column(
        Integer,
        server_default=text("0"),
        comment="Claim order: higher first; within a priority, round-robin across orgs",
    )
    idempotency_key: Mapped[str | None] = mapped_column(
        String(255), comment="Client-provided key for deduplication"
    )
    run_at: Mapped[datetime] = mapped_column(
        TIMESTAMP(timezone=True),
        server_default=text("now()"),
        comment="Due time: a queued job is not claimed before it (scheduling, retry backoff)",
    )
    requested_by: Mapped[str | None] = mapped_column(
        String(255), comment="User/service that requested the job"
    )
    created_at: Mapped[datetime] = mapped_column(
        TIMESTAMP(timezone=True), server_default=text("now()"), comment="Job creation timestamp"
    )
    updated_at: Mapped[datetime] = mapped_column(
        TIMESTAMP(timezone=True),
        server_default=text("now()"),
        comment="Last modification timestamp",
    )
    started_at: Mapped[datetime | None] = mapped_column(
        TIMESTAMP(timezone=True), comment="When job execution started"
    )
    finished_at: Mapped[datetime | None] = mapped_column(
        TIMESTAMP(timezone=True), comment="When job reached terminal state"
    )
    last_error_code: Mapped[str | None] = mapped_column(
        String(ERROR_CODE_MAX),
        comment="Error classification (e.g., 'TIMEOUT', 'VALIDATION_ERROR')",
    )
    last_error_message: Mapped[str | None] = mapped_column(
        String(ERROR_MESSAGE_MAX), comment="Human-readable error detail"
    )
    params: Mapped[dict[str, Any]] = mapped_column(
        JSONB(),
        server_default=text("'{}'::jsonb"),
        comment="Job type specific input, as submitted",
    )
    request_fingerprint: Mapped[str | None] = mapped_column(
        String(64),
        comment="sha256 of the canonical submitted body; tells an idempotent replay from a clash",
    )
    stage: Mapped[str | None] = mapped_column(
        String(STAGE_MAX), comment="Stage the running attempt last reported"
    )
    progress: Mapped[int] = mapped_column(
        Integer, server_default=text("0"), comment="Progress of the current attempt, 0-100"
    )
    result: Mapped[dict[str, Any] | None] = mapped_column(
        JSONB(), comment="Handler output of the succeeded attempt"
    )
    cancel_requested: Mapped[bool] = mapped_column(
        Boolean,
        server_default=text("false"),
        comment="Cancel asked while running; the worker stops at the next stage boundary",
    )
    lease_token: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), comment="Identifies the claim of the running attempt"
    )
    leased_by: Mapped[str | None] = mapped_column(
        String(255), comment="Worker holding the lease of the running attempt"
    )
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        TIMESTAMP(timezone=True),
        comment="The reaper requeues a running job whose lease expired before this time",
    )
    heartbeat_at: Mapped[datetime | None] = mapped_column(
        TIMESTAMP(timezone=True), comment="Last heartbeat of the worker holding the lease"
    )
    turn: Mapped[int | None] = mapped_column(
        BigInteger,
        comment="Claim order within a priority (fair queuing across orgs); NULL until placed",
    )
    timeout_seconds: Mapped[int | None] = mapped_column(
        Integer,
        comment="Execution timeout of each attempt in seconds, lower than its job type timeout",
    )
    checkpoint: Mapped[dict[str, Any] | None] = mapped_column(
        JSONB(),
        comment="Stage, progress and state saved by the handler; the next attempt resumes",
    )
    queue: Mapped[str] = mapped_column(
        String(100),
        server_default=text("'default'"),
        comment="Queue (worker pool) the job runs in",
    )
    held: Mapped[bool] = mapped_column(
        Boolean,
        server_default=text("false"),
        comment="Set aside by the placer: a cap of its scope is full, or it is paused",
    )


# The fair queue's clock: about the highest turn claimed so far. Claims advance it; a job is
# never placed at a turn before it (repository/worker.py, THE CLAIM).
TURN_CLOCK = Sequence("job_turn_clock", start=0, minvalue=0, metadata=Base.metadata)


class JobEvent(Base):
    __tablename__ = "job_event"
    __table_args__ = (
        Index(None, "job_id", "ts"),
        Index(None, "ts"),
        {"comment": "Immutable audit log of job state transitions"},
    )

    id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True),
        primary_key=True,
        server_default=text("gen_random_uuid()"),
        comment="Unique event identifier",
    )
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True),
        ForeignKey("job.id", ondelete="CASCADE"),
        comment="Reference to parent job",
    )
    ts: Mapped[datetime] = mapped_column(
        TIMESTAMP(timezone=True), server_default=text("now()"), comment="Event occurrence timestamp"
    )
    prev_status: Mapped[str | None] = mapped_column(
        String(50), comment="Status before transition (NULL for initial state)"
    )
    next_status: Mapped[str] = mapped_column(String(50), comment="Status after transition")
    detail_json: Mapped[dict[str, Any] | None] = mapped_column(
        JSONB(), comment="Additional event metadata (stage, progress, error details)"
    )


class JobSchedule(Base):
    __tablename__ = "job_schedule"
    __table_args__ = (
        Index(None, "next_fire_at", postgresql_where=text("NOT paused")),
        {"comment": "Periodic schedules: each fire time becomes one job"},
    )

    org_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), primary_key=True, comment="Organization the schedule's jobs belong to"
    )
    name: Mapped[str] = mapped_column(
        String(100), primary_key=True, comment="Schedule name, unique per org"
    )
    type: Mapped[str] = mapped_column(String(100), comment="Job type each fire submits")
    params: Mapped[dict[str, Any]] = mapped_column(
        JSONB(), server_default=text("'{}'::jsonb"), comment="Params of each submitted job"
    )
    cron: Mapped[str] = mapped_column(String(200), comment="Cron expression (five fields, UTC)")
    declared: Mapped[bool] = mapped_column(
        Boolean,
        server_default=text("false"),
        comment="Declared by a job type (workers keep it in step) rather than added per org",
    )
    paused: Mapped[bool] = mapped_column(
        Boolean,
        server_default=text("false"),
        comment="A paused schedule does not fire; resuming skips the fire times it missed",
    )
    next_fire_at: Mapped[datetime] = mapped_column(
        TIMESTAMP(timezone=True), comment="Next fire time"
    )
    last_fire_at: Mapped[datetime | None] = mapped_column(
        TIMESTAMP(timezone=True), comment="Fire time of the last job submitted"
    )
    last_job_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True),
        comment="Last job submitted (not a foreign key: retention may delete it)",
    )
    created_at: Mapped[datetime] = mapped_column(
        TIMESTAMP(timezone=True),
        server_default=text("now()"),
        comment="Schedule creation timestamp",
    )
    updated_at: Mapped[datetime] = mapped_column(
        TIMESTAMP(timezone=True),
        server_default=text("now()"),
        comment="Last modification timestamp",
    )


class Backfill(Base):
    __tablename__ = "job_backfill"
    __table_args__ = (
        CheckConstraint("batch_size > 0", name="batch_size_positive"),
        CheckConstraint(
            "coalesce(rows_per_second, 1) > 0 AND coalesce(pause_factor, 0) >= 0",
            name="throttle_positive",
        ),
        {"comment": "Backfills handed to the ledger by data revisions, with their progress"},
    )

    name: Mapped[str] = mapped_column(
        String(100), primary_key=True, comment="Backfill name, unique"
    )
    revision: Mapped[str] = mapped_column(String(64), comment="Revision that recorded the backfill")
    table_name: Mapped[str] = mapped_column(String(200), comment="Table the batches walk")
    key_column: Mapped[str] = mapped_column(
        String(63), comment="Unique column the batches walk in order"
    )
    batch_sql: Mapped[str] = mapped_column(
        Text, comment="Statement run per batch, over the keys lo to hi (bind parameters)"
    )
    batch_size: Mapped[int] = mapped_column(Integer, comment="Keys per batch")
    rows_per_second: Mapped[float | None] = mapped_column(
        Double,
        comment="Throttle: pause after each batch so the rate stays under this (NULL: none)",
    )
    pause_factor: Mapped[float | None] = mapped_column(
        Double, comment="Throttle: pause this many times each batch's duration (NULL: none)"
    )
    estimated_rows: Mapped[int] = mapped_column(
        BigInteger,
        server_default=text("0"),
        comment="Rows in the table when the backfill was recorded (an estimate)",
    )
    rows_done: Mapped[int] = mapped_column(
        BigInteger,
        server_default=text("0"),
        comment="Rows (keys) the batches done so far covered",
    )
    batches_done: Mapped[int] = mapped_column(
        Integer, server_default=text("0"), comment="Batches done"
    )
    last_key: Mapped[str | None] = mapped_column(
        Text, comment="Last key done, as text (NULL: none yet)"
    )
    paused_seconds: Mapped[float] = mapped_column(
        Double, server_default=text("0"), comment="Time the throttle paused, in seconds"
    )
    job_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True),
        comment="The heimdex.backfill job (not a foreign key: retention may delete it)",
    )
    created_at: Mapped[datetime] = mapped_column(
        TIMESTAMP(timezone=True),
        server_default=text("now()"),
        comment="When the revision recorded the backfill",
    )
    started_at: Mapped[datetime | None] = mapped_column(
        TIMESTAMP(timezone=True), comment="When the first batch ran"
    )
    finished_at: Mapped[datetime | None] = mapped_column(
        TIMESTAMP(timezone=True), comment="When the last batch ran (NULL: not done)"
    )
    updated_at: Mapped[datetime] = mapped_column(
        TIMESTAMP(timezone=True), server_default=text("now()"), comment="Last progress"
    )


class JobLimit(Base):
    """A scope's cap and an org's weight (ledger/repository/limits.py, QUEUES, CAPS, SHARES)."""

    __tablename__ = "job_limit"
    __table_args__ = (
        UniqueConstraint("org_id", "queue", postgresql_nulls_not_distinct=True),
        CheckConstraint("org_id IS NOT NULL OR queue IS NOT NULL", name="scope"),
        CheckConstraint("max_running IS NULL OR max_running >= 0", name="max_running"),
        CheckConstraint("weight BETWEEN 1 AND 1000", name="weight"),
        CheckConstraint("used >= 0", name="used"),
        Index("idx_job_limit__waiting", "id", postgresql_where=text("waiting")),
        Index(
            "idx_job_limit__room",
            "id",
            postgresql_where=text("waiting AND used < max_running"),
        ),
        {"comment": "Caps on jobs placed or running per scope, and org weights"},
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    org_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), comment="Org of the scope (NULL: every org of the queue)"
    )
    queue: Mapped[str | None] = mapped_column(
        String(100), comment="Queue of the scope (NULL: every queue of the org)"
    )
    max_running: Mapped[int | None] = mapped_column(
        Integer, comment="Most jobs placed or running at once (NULL: no cap)"
    )
    weight: Mapped[int] = mapped_column(
        Integer,
        server_default=text("1"),
        comment="Weight of the org in the fair queue (org rows without a queue)",
    )
    used: Mapped[int] = mapped_column(
        Integer,
        server_default=text("0"),
        comment="Jobs placed or running counted against the cap (a semaphore)",
    )
    waiting: Mapped[bool] = mapped_column(
        Boolean, server_default=text("false"), comment="Held jobs wait for a slot of this scope"
    )
    updated_at: Mapped[datetime] = mapped_column(
        TIMESTAMP(timezone=True),
        server_default=text("now()"),
        comment="Last change of the cap or weight",
    )


class JobPause(Base):
    __tablename__ = "job_pause"
    __table_args__ = (
        CheckConstraint("kind IN ('queue', 'type', 'org')", name="kind"),
        {"comment": "Paused queues, job types and orgs: their queued jobs are not claimed"},
    )

    kind: Mapped[str] = mapped_column(Text, primary_key=True, comment="queue, type or org")
    value: Mapped[str] = mapped_column(
        String(100), primary_key=True, comment="Name of the queue or type, or the org id"
    )
    actor: Mapped[str] = mapped_column(String(200), comment="Who paused it")
    reason: Mapped[str] = mapped_column(String(1000), comment="Why")
    since: Mapped[datetime] = mapped_column(
        TIMESTAMP(timezone=True), server_default=text("now()"), comment="When it was paused"
    )


class JobControlEvent(Base):
    __tablename__ = "job_control_event"
    __table_args__ = (
        Index(None, "ts"),
        {"comment": "Audit log of limit and pause changes"},
    )

    id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")
    )
    ts: Mapped[datetime] = mapped_column(
        TIMESTAMP(timezone=True), server_default=text("now()"), comment="When"
    )
    action: Mapped[str] = mapped_column(
        String(50), comment="limit_set, limit_unset, paused or resumed"
    )
    scope: Mapped[dict[str, Any]] = mapped_column(
        JSONB(), comment="What it applies to, with the values set"
    )
    actor: Mapped[str] = mapped_column(String(200), comment="Who")
    reason: Mapped[str] = mapped_column(String(1000), comment="Why")
