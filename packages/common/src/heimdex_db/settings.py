"""How an upgrade runs: the environment `heimdex db upgrade` and plain `alembic` read, in one place.

Separate from `heimdex.settings.Settings`: a revision runs inside Alembic, which knows nothing
of the runtime's configuration, and these values tune a run without changing the compiled SQL.
"""

from __future__ import annotations

import re

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from heimdex.errors import HeimdexError

DEFAULT_LOCK_TIMEOUT = "5s"
DEFAULT_BATCH_SIZE = 5000
DEFAULT_RETRY_DEADLINE = 300.0
DEFAULT_MAINTENANCE_WORK_MEM = "256MB"
LOCK_TIMEOUT_ENV = "HEIMDEX_LOCK_TIMEOUT"
BATCH_SIZE_ENV = "HEIMDEX_BACKFILL_BATCH"
RETRY_DEADLINE_ENV = "HEIMDEX_LOCK_RETRY_DEADLINE"
MAINTENANCE_WORK_MEM_ENV = "HEIMDEX_MAINTENANCE_WORK_MEM"
DURATION = re.compile(r"^\d+(ms|s|min)?$")
_MEMORY = re.compile(r"^\d+(kB|MB|GB)$")


class MigrationSettings(BaseSettings):
    """`HEIMDEX_LOCK_TIMEOUT` (an online run's lock_timeout, unset: 5s or `--lock-timeout`),
    `HEIMDEX_BACKFILL_BATCH` (rows per backfill statement), `HEIMDEX_LOCK_RETRY_DEADLINE`
    (seconds a lock timeout is retried) and `HEIMDEX_MAINTENANCE_WORK_MEM` (an index build's
    sort memory)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    lock_timeout: str | None = Field(default=None, validation_alias=LOCK_TIMEOUT_ENV)
    backfill_batch: int = Field(default=DEFAULT_BATCH_SIZE, validation_alias=BATCH_SIZE_ENV)
    lock_retry_deadline: float = Field(
        default=DEFAULT_RETRY_DEADLINE, validation_alias=RETRY_DEADLINE_ENV
    )
    maintenance_work_mem: str = Field(
        default=DEFAULT_MAINTENANCE_WORK_MEM, validation_alias=MAINTENANCE_WORK_MEM_ENV
    )

    @field_validator("lock_timeout")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value and not DURATION.match(value):
            raise ValueError(f"must look like 5s, 500ms or 1min, not {value!r}")
        return value or None

    @field_validator("backfill_batch", mode="before")
    @classmethod
    def _positive(cls, value: object) -> object:
        if not str(value).isdigit() or int(str(value)) < 1:
            raise ValueError(f"must be a positive integer, not {value!r}")
        return value

    @field_validator("lock_retry_deadline", mode="before")
    @classmethod
    def _seconds(cls, value: object) -> object:
        try:
            float(str(value))
        except ValueError:
            raise ValueError(f"must be a number of seconds, not {value!r}") from None
        return value

    @field_validator("maintenance_work_mem")
    @classmethod
    def _memory(cls, value: str) -> str:
        if not _MEMORY.match(value):
            raise ValueError(f"must look like 256MB, 65536kB or 1GB, not {value!r}")
        return value

    @classmethod
    def from_env(cls) -> MigrationSettings:
        """The environment's settings, or one line naming the variable that is wrong."""
        try:
            return cls()
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0]) if error["loc"] else "a setting"
            message = str(error["msg"]).removeprefix("Value error, ")
            raise HeimdexError(f"{name} {message}") from None
