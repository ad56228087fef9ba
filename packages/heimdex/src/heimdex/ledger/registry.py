"""Job types: what an application registers so the ledger accepts and runs its jobs.

A type is a name, a pydantic model for its params and (in the process that runs it) a handler.
Applications declare types in a `JobTypes` collection and publish it in the `heimdex.jobs`
entry-point group (or name it in `HEIMDEX_JOB_MODULES`); `load_registry` merges them at startup.
Nothing registers itself at import: a collection is plain data until an entrypoint loads it.

    jobs = JobTypes()

    class TranscodeParams(BaseModel):
        asset_id: str

    @jobs.register("transcode", params=TranscodeParams)
    def transcode(ctx: JobContext, params: TranscodeParams) -> dict[str, Any]:
        ctx.stage("probing", progress=10)
        ...
        return {"renditions": 3}

A type may bound each attempt (`register(..., timeout="2h")`); a submission may lower it. The
handler's context (`JobContext`) stops it at the deadline, runs child processes it can stop, and
saves checkpoints the next attempt resumes from: docs/job-types.md.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from importlib.metadata import entry_points
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError
from sqlalchemy import Connection

from heimdex.errors import HeimdexError, flatten_validation_errors
from heimdex.ledger.cron import check_cron
from heimdex.ledger.errors import InvalidParams, TimeoutAboveType, UnknownJobType
from heimdex.models import DEFAULT_QUEUE, QUEUE_MAX

ENTRY_POINT_GROUP = "heimdex.jobs"
# The org of a schedule a job type declares without `schedule_org`.
SYSTEM_ORG_ID = uuid.UUID(int=0)


class JobContext(Protocol):
    """What a handler sees of its attempt."""

    @property
    def job_id(self) -> uuid.UUID:
        """The job this attempt runs."""

    @property
    def attempt(self) -> int:
        """Failed attempts before this one (0 on the first run)."""

    @property
    def resumed(self) -> bool:
        """Whether an earlier attempt saved a checkpoint this attempt starts from."""

    @property
    def state(self) -> dict[str, Any]:
        """The state of the last checkpoint (empty when not resumed)."""

    @property
    def checkpoint_stage(self) -> str | None:
        """The stage of the last checkpoint (None when not resumed)."""

    def stage(self, name: str, progress: int) -> None:
        """Record a stage boundary; raises to stop the attempt (cancel, shutdown, lost lease,
        timeout)."""

    def checkpoint(self, name: str, progress: int, state: Mapping[str, Any]) -> None:
        """`stage` that also saves `state` (small JSON) with the job, in the same statement;
        the next attempt starts with it (`resumed`, `state`)."""

    def check(self) -> None:
        """Raise if the attempt must stop now (timeout, shutdown, lost lease); no database
        round trip, so a loop may call it often."""

    def connect(self) -> AbstractContextManager[Connection]:
        """A connection to the ledger's database, from the worker's pool, for a job that works
        on the database itself (the built-in `heimdex.backfill`); the handler owns its
        transactions. A worker keeps a few such connections whatever its concurrency
        (`HEIMDEX_WORKER_DB_CONNECTIONS`): hold one for a batch, not for the whole attempt."""

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """`subprocess.Popen` in a session of its own, terminated (then killed after the grace
        period) with its process group at the attempt's deadline."""

    def run_process(
        self, args: Sequence[str], *, check: bool = True, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run a child process to its end through `popen`; raises `JobTimeout` when the deadline
        stopped it, `subprocess.CalledProcessError` when it failed and `check`."""


class JobError(Exception):
    """A handler's failure with a stable error code. Retried unless `retryable` is False."""

    retryable = True

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class PermanentJobError(JobError):
    """A failure that another attempt cannot fix: the job ends `failed`."""

    retryable = False


class JobTimeout(JobError):
    """The attempt passed its execution timeout; retried by the job's policy."""

    def __init__(self, message: str = "the attempt passed its execution timeout") -> None:
        super().__init__("TIMEOUT", message)


Handler = Callable[[JobContext, Any], Mapping[str, Any] | None]
Timeout = str | int | float | timedelta | None
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)?\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def timeout_seconds(name: str, value: Timeout) -> int | None:
    """A job type's timeout in whole seconds: `"2h"`, `"30m"`, `"90s"`, `"1d"`, a number of
    seconds or a timedelta; None for no timeout."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value).lower())
        if match is None:
            raise HeimdexError(
                f"job type {name!r}: a timeout looks like 2h, 30m, 90s or a number of seconds, "
                f"not {value!r}"
            )
        seconds = int(match.group(1)) * _SECONDS[match.group(2) or "s"]
    if seconds < 1:
        raise HeimdexError(f"job type {name!r}: the timeout must be at least 1 second")
    return int(seconds)


@dataclass(frozen=True)
class JobType:
    name: str
    params: type[BaseModel]
    handler: Handler | None = None
    source: str = ""
    timeout_seconds: int | None = None
    schedule: str | None = None
    """A cron expression: each fire time submits a job of this type (ledger/schedules.py)."""
    schedule_org: uuid.UUID = SYSTEM_ORG_ID
    schedule_params: Mapping[str, Any] = field(default_factory=dict)
    queue: str = DEFAULT_QUEUE
    """The queue (worker pool) its jobs run in: `heimdex worker --queues` claims by queue."""

    def timeout_for(self, job_timeout: int | None) -> int | None:
        """The timeout of an attempt: the submission's when it set one, else the type's."""
        return job_timeout if job_timeout is not None else self.timeout_seconds

    def check_timeout(self, asked: int | None) -> None:
        """A submission's timeout may lower the type's, never raise it."""
        if (
            asked is not None
            and self.timeout_seconds is not None
            and (asked > self.timeout_seconds)
        ):
            raise TimeoutAboveType(self.name, asked, self.timeout_seconds)

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The params with defaults filled in, as stored; `InvalidParams` names each problem."""
        return self.parse(params).model_dump(mode="json")

    def parse(self, params: Mapping[str, Any]) -> BaseModel:
        try:
            return self.params.model_validate(params)
        except ValidationError as exc:
            problems, _ = flatten_validation_errors(exc.errors(), root="params")
            raise InvalidParams(self.name, problems) from None


def _job_type(
    name: str,
    params: type[BaseModel],
    *,
    timeout: Timeout,
    schedule: str | None,
    schedule_org: uuid.UUID,
    schedule_params: Mapping[str, Any] | None,
    queue: str,
) -> JobType:
    check_queue_name(queue, what=f"job type {name!r}: queue")
    job_type = JobType(
        name,
        params,
        timeout_seconds=timeout_seconds(name, timeout),
        schedule=schedule,
        schedule_org=schedule_org,
        schedule_params=dict(schedule_params or {}),
        queue=queue,
    )
    if schedule is not None:
        try:
            check_cron(schedule)
        except HeimdexError as exc:
            raise HeimdexError(f"job type {name!r}: {exc}") from None
        try:
            job_type.validate(job_type.schedule_params)
        except InvalidParams as exc:
            raise HeimdexError(f"job type {name!r}: schedule_params: {exc}") from None
    return job_type


class JobTypes:
    """A collection of job types an application publishes (see the module docstring)."""

    def __init__(self) -> None:
        self._types: dict[str, JobType] = {}
        self._handlers: dict[str, Handler] = {}

    def register(
        self,
        name: str,
        *,
        params: type[BaseModel],
        timeout: Timeout = None,
        schedule: str | None = None,
        schedule_org: uuid.UUID = SYSTEM_ORG_ID,
        schedule_params: Mapping[str, Any] | None = None,
        queue: str = DEFAULT_QUEUE,
    ) -> Callable[[Handler], Handler]:
        """Decorator: declare `name` with its params model, its execution timeout (per
        attempt; none by default), optionally a cron `schedule` that submits a job with
        `schedule_params` under `schedule_org` at each fire time, its `queue` (the worker pool
        that runs it; `default` unless named), and the decorated handler."""
        job_type = _job_type(
            name,
            params,
            timeout=timeout,
            schedule=schedule,
            schedule_org=schedule_org,
            schedule_params=schedule_params,
            queue=queue,
        )

        def register(handler: Handler) -> Handler:
            self._add(replace(job_type, handler=handler))
            return handler

        return register

    def declare(
        self,
        name: str,
        *,
        params: type[BaseModel],
        timeout: Timeout = None,
        schedule: str | None = None,
        schedule_org: uuid.UUID = SYSTEM_ORG_ID,
        schedule_params: Mapping[str, Any] | None = None,
        queue: str = DEFAULT_QUEUE,
    ) -> None:
        """Declare a type without a handler: the API accepts it, a worker must supply one."""
        self._add(
            _job_type(
                name,
                params,
                timeout=timeout,
                schedule=schedule,
                schedule_org=schedule_org,
                schedule_params=schedule_params,
                queue=queue,
            )
        )

    def handler(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator: the handler of a type declared elsewhere (by `declare`)."""

        def register(handler: Handler) -> Handler:
            self._handlers[name] = handler
            return handler

        return register

    def _add(self, job_type: JobType) -> None:
        if job_type.name in self._types:
            raise HeimdexError(f"job type {job_type.name!r} is declared twice")
        if not 1 <= len(job_type.name) <= 100:
            raise HeimdexError(f"job type name {job_type.name!r} must be 1 to 100 characters")
        self._types[job_type.name] = job_type

    def types(self) -> list[JobType]:
        return list(self._types.values())

    def handlers(self) -> dict[str, Handler]:
        return dict(self._handlers)


class Registry:
    """Every job type this process knows, merged from the collections an entrypoint loaded."""

    def __init__(self, collections: Iterable[tuple[str, JobTypes]]) -> None:
        types: dict[str, JobType] = {}
        handlers: dict[str, tuple[str, Handler]] = {}
        for source, collection in collections:
            for job_type in collection.types():
                if job_type.name in types:
                    raise HeimdexError(
                        f"job type {job_type.name!r} is declared by both "
                        f"{types[job_type.name].source} and {source}"
                    )
                types[job_type.name] = replace(job_type, source=source)
            for name, handler in collection.handlers().items():
                handlers[name] = (source, handler)
        for name, (source, handler) in handlers.items():
            if name not in types:
                raise HeimdexError(f"{source} has a handler for undeclared job type {name!r}")
            current = types[name]
            if current.handler is not None:
                raise HeimdexError(
                    f"job type {name!r} has two handlers ({current.source}, {source})"
                )
            types[name] = replace(current, handler=handler)
        self._types = types

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def names(self) -> list[str]:
        return sorted(self._types)

    def get(self, name: str) -> JobType:
        job_type = self._types.get(name)
        if job_type is None:
            raise UnknownJobType(name, self.names())
        return job_type

    def validate(self, name: str, params: Mapping[str, Any]) -> dict[str, Any]:
        return self.get(name).validate(params)

    def without_handler(self, queues: Iterable[str] | None = None) -> list[str]:
        """Types without a handler, of `queues` only when given."""
        wanted = None if queues is None else set(queues)
        return sorted(
            name
            for name, t in self._types.items()
            if t.handler is None and (wanted is None or t.queue in wanted)
        )

    def queues(self) -> list[str]:
        """The queues of every type known here."""
        return sorted({t.queue for t in self._types.values()})


_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")


def check_queue_name(queue: str, *, what: str = "queue") -> str:
    """A queue name: 1 to 100 letters, digits and `_.:-`, starting with a letter or digit."""
    if not (len(queue) <= QUEUE_MAX and _QUEUE_NAME.fullmatch(queue)):
        raise HeimdexError(
            f"{what} {queue!r} must be 1 to {QUEUE_MAX} letters, digits or _.:- "
            "(starting with a letter or digit)"
        )
    return queue


def _load_object(spec: str) -> JobTypes:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise HeimdexError(f"job module {spec!r} must be written module:attribute")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise HeimdexError(f"cannot load job types from {spec!r}: {exc}") from None
    if not isinstance(found, JobTypes):
        raise HeimdexError(f"{spec!r} is a {type(found).__name__}, not a JobTypes collection")
    return found


def load_registry(extra_modules: Iterable[str] = ()) -> Registry:
    """The `heimdex.jobs` entry points plus `extra_modules` (`module:attribute` each)."""
    collections: list[tuple[str, JobTypes]] = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        collections.append((f"entry point {ep.name!r} ({ep.value})", _load_object(ep.value)))
    for spec in extra_modules:
        collections.append((spec, _load_object(spec)))
    return Registry(collections)
