"""What every `heimdex db` command works on, built once by its caller and passed in.

As `alembic.command.upgrade(config, revision)` takes one `Config`, the commands of this package
take one `DbContext`: the Alembic config of the history, the database (when the command needs
one) and how an upgrade takes its locks. The CLI builds it from its options and the settings;
tests and `verify` build their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL

from heimdex.errors import HeimdexError
from heimdex.settings import normalize_url
from heimdex_db.config import alembic_config
from heimdex_db.history import scripts_of
from heimdex_db.settings import DEFAULT_LOCK_TIMEOUT, DURATION

DEFAULT_RETRIES = 3
DEFAULT_RETRY_DELAY = 1.0
DEFAULT_LOCK_WAIT = 600.0


@dataclass(frozen=True)
class Tuning:
    """How `upgrade`/`downgrade` take locks (the CLI's --lock-timeout, --retries, --lock-wait).

    `lock_timeout` bounds every DDL statement's wait for a lock; a revision that fails on it is
    rolled back and retried `retries` times, `retry_delay` * attempt seconds apart; `lock_wait`
    is how long to wait for another upgrader's migration lock.
    """

    lock_timeout: str = DEFAULT_LOCK_TIMEOUT
    retries: int = DEFAULT_RETRIES
    retry_delay: float = DEFAULT_RETRY_DELAY
    lock_wait: float = DEFAULT_LOCK_WAIT

    def __post_init__(self) -> None:
        # Checked here because it is interpolated into SET lock_timeout.
        if not DURATION.match(self.lock_timeout):
            raise HeimdexError(
                f"--lock-timeout must look like 5s, 500ms or 1min, not {self.lock_timeout!r}"
            )
        if self.retries < 0:
            raise HeimdexError("--retries must be 0 or more")


@dataclass(frozen=True)
class DbContext:
    """The history (`config`), the database a command works on, and the lock tuning.

    `database_url` stays None for commands that need no database (`sql`, `lint`, a revision
    written without --autogenerate); `url` says so clearly if one is asked for anyway.
    """

    config: Config
    database_url: URL | None = None
    tuning: Tuning = field(default_factory=Tuning)

    @classmethod
    def build(
        cls,
        ini: Path | str | None = None,
        *,
        database_url: URL | str | None = None,
        tuning: Tuning | None = None,
    ) -> DbContext:
        """A context for `ini` (default: the repository's alembic.ini) and `database_url`."""
        url = normalize_url(database_url) if database_url is not None else None
        return cls(alembic_config(ini, database_url=url), url, tuning or Tuning())

    @property
    def ini(self) -> Path:
        return Path(str(self.config.config_file_name))

    @property
    def url(self) -> URL:
        if self.database_url is None:
            raise HeimdexError(
                "this command needs a database: pass --database-url or set DATABASE_URL"
            )
        return self.database_url

    def scripts(self) -> ScriptDirectory:
        """The revision history, read afresh (a revision written meanwhile is in it)."""
        return scripts_of(self.config)

    def on(self, database_url: URL | str, *, tuning: Tuning | None = None) -> DbContext:
        """The same history on another database (a fresh `Config`: its attributes are per run)."""
        return DbContext.build(self.ini, database_url=database_url, tuning=tuning or self.tuning)
