"""Building an Alembic `Config` for the ledger history (or a copy of it)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL

from heimdex_common.errors import HeimdexError
from heimdex_common.settings import normalize_url

PACKAGE_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_INI = PACKAGE_ROOT / "alembic.ini"


def alembic_config(
    ini: Path | str | None = None,
    *,
    database_url: URL | str | None = None,
    configure_logger: bool = False,
) -> Config:
    """A `Config` for `ini` (default: the repository's `packages/common/alembic.ini`).

    `database_url` is handed to env.py through `Config.attributes`, never written into the ini
    options, so a password with `%` needs no escaping and is never rendered.
    """
    path = Path(ini) if ini is not None else DEFAULT_INI
    if not path.is_file():
        raise HeimdexError(f"alembic config not found: {path}")
    cfg = Config(str(path))
    cfg.attributes["configure_logger"] = configure_logger
    if database_url is not None:
        cfg.attributes["database_url"] = normalize_url(database_url)
    return cfg


def script_directory(cfg: Config) -> ScriptDirectory:
    return ScriptDirectory.from_config(cfg)
