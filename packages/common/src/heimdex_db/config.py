"""Building an Alembic `Config` for the ledger history (or a copy of it)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.engine import URL

from heimdex.errors import HeimdexError
from heimdex.settings import normalize_url

# The one place the layout is known. In a checkout this file is
# <repo>/packages/common/src/heimdex_db/config.py and the history sits beside alembic.ini in
# packages/common (where the migration playbook expects it); an installed wheel carries both
# inside the package (pyproject.toml, force-include).
_HERE = Path(__file__).resolve().parent
_CHECKOUT_ROOT = _HERE.parents[1]
PACKAGE_ROOT = _CHECKOUT_ROOT if (_CHECKOUT_ROOT / "alembic.ini").is_file() else _HERE
REPO_ROOT = _CHECKOUT_ROOT.parents[1]
DEFAULT_INI = PACKAGE_ROOT / "alembic.ini"
ARTIFACT_DIR = REPO_ROOT / "supabase" / "migrations"
WORKSPACE_PYPROJECT = REPO_ROOT / "pyproject.toml"

# Alembic's bookkeeping lives outside `public`, which Supabase's Data API exposes.
VERSION_TABLE_SCHEMA = "heimdex_private"
VERSION_TABLE_OPTIONS = {"version_table_schema": VERSION_TABLE_SCHEMA}

# Alembic reads the version table before any revision runs, so moving it out of `public` cannot
# be a revision's job: env.py runs this first, online and at the top of offline SQL alike.
# Idempotent, and a no-op on an up-to-date database (it only reads the catalogs then).
VERSION_TABLE_PRELUDE = f"""DO $version_table$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = '{VERSION_TABLE_SCHEMA}') THEN
        CREATE SCHEMA {VERSION_TABLE_SCHEMA};
    END IF;
    IF to_regclass('public.alembic_version') IS NULL THEN
        RETURN;
    END IF;
    IF to_regclass('{VERSION_TABLE_SCHEMA}.alembic_version') IS NOT NULL THEN
        RAISE EXCEPTION USING
            MESSAGE = 'both public.alembic_version and {VERSION_TABLE_SCHEMA}.alembic_version '
                      'exist: the revision this database is at is ambiguous',
            HINT = 'keep the one holding the right revision, drop the other, and run again; '
                   'nothing was changed';
    END IF;
    ALTER TABLE public.alembic_version SET SCHEMA {VERSION_TABLE_SCHEMA};
END
$version_table$"""


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


def migration_context(connection: Connection) -> MigrationContext:
    """A `MigrationContext` that reads the version table where env.py keeps it.

    Anything that asks a database for its revision outside env.py must go through this:
    a bare `MigrationContext.configure(conn)` looks in `public` and reports no revision.
    """
    return MigrationContext.configure(connection, opts=dict(VERSION_TABLE_OPTIONS))
