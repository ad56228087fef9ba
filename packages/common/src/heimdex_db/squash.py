"""`heimdex db squash --to REV`: one baseline revision for the history up to REV.

The baseline is not written by hand: the history is replayed up to REV in a scratch database
and dumped with pg_dump (schema, grants, RLS policies, functions, triggers, and the rows the
history inserts, sequences included). It takes REV's own id, so a database stamped REV or later
keeps upgrading unchanged, and a fresh one runs the baseline instead of the chain. The squashed
revisions move to `<script_location>/squashed/<REV>/versions`, with an alembic.ini of their own
(the old chain): a database between the old base and REV is told to finish that chain first.

Before anything is written, the baseline is applied to another scratch database and dumped
again: both dumps must be identical.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

from alembic.script import Script
from sqlalchemy import text
from sqlalchemy.engine import URL

from heimdex.errors import HeimdexError
from heimdex_db import migrate
from heimdex_db.baseline import files_of
from heimdex_db.config import VERSION_TABLE_SCHEMA
from heimdex_db.context import DbContext, Tuning
from heimdex_db.history import connect, ordered_revisions, resolve_revision
from heimdex_db.localpg import find_bindir
from heimdex_db.supabase.artifacts import compile_artifacts
from heimdex_db.verify.command import scratch_database

SQUASHED_DIR = "squashed"
VERSION_TABLE = f"{VERSION_TABLE_SCHEMA}.alembic_version"
# pg_dump's session settings, made local to the baseline's transaction: a later revision run on
# the same connection (plain `alembic upgrade head`) must not inherit an empty search_path.
_SET = re.compile(r"^SET (\w+) = (.*);$", re.MULTILINE)
_SEARCH_PATH = "SELECT pg_catalog.set_config('search_path', '', false);"
# The roles that exist in every cluster, and the one that ran the replay (owner of it all).
_BUILTIN_ROLES = re.compile(r"^pg_")


class SquashFailed(HeimdexError):
    """The history cannot be squashed as asked, or the baseline would not equal it."""


@dataclass(frozen=True)
class SquashResult:
    baseline: Path
    old_chain: Path
    squashed: list[str]


@dataclass(frozen=True)
class Dump:
    schema: str
    data: str
    drops: str


def _pg_dump(url: URL, *args: str) -> str:
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    proc = subprocess.run(
        [
            str(find_bindir() / "pg_dump"),
            "--no-owner",
            f"--exclude-table={VERSION_TABLE}",
            *args,
            "--dbname",
            dsn,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SquashFailed(f"pg_dump failed: {proc.stderr.strip().splitlines()[-1]}")
    return proc.stdout


def _runnable(sql: str) -> str:
    """pg_dump's text as one transaction's SQL: no psql meta-commands, settings made local."""
    lines = [line for line in sql.splitlines() if not line.startswith("\\")]
    out = "\n".join(lines)
    out = out.replace(_SEARCH_PATH, "SELECT pg_catalog.set_config('search_path', '', true);")
    return _SET.sub(r"SET LOCAL \1 = \2;", out).strip() + "\n"


def _roles(url: URL) -> list[str]:
    """Roles the schema grants to or names in a policy: created by the history, not dumped."""
    query = text(
        """
        SELECT DISTINCT pg_get_userbyid(a.grantee)
          FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
         CROSS JOIN LATERAL aclexplode(c.relacl) a
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND a.grantee <> 0
        UNION
        SELECT pg_get_userbyid(a.grantee)
          FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a
         WHERE n.nspname NOT LIKE 'pg\\_%' AND a.grantee <> 0
        UNION
        SELECT pg_get_userbyid(a.grantee)
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         CROSS JOIN LATERAL aclexplode(p.proacl) a
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND a.grantee <> 0
        UNION
        SELECT unnest(roles)::text FROM pg_policies
        """
    )
    with connect(url) as conn:
        names = set(conn.execute(query).scalars())
        me = conn.execute(text("SELECT current_user")).scalar_one()
    return sorted(n for n in names if n not in (me, "public") and not _BUILTIN_ROLES.match(n))


def _all_roles(url: URL) -> set[str]:
    with connect(url) as conn:
        return set(conn.execute(text("SELECT rolname FROM pg_roles")).scalars())


def _roles_sql(roles: list[str]) -> str:
    if not roles:
        return ""
    names = ", ".join(f"'{r}'" for r in roles)
    return f"""DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY[{names}] LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r);
        BEGIN
            EXECUTE 'CREATE ROLE ' || quote_ident(r) || ' NOLOGIN';
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION USING
                    MESSAGE = 'role ' || r || ' does not exist and ' || current_user
                              || ' may not create it',
                    HINT = 'create it (NOLOGIN) as a superuser, or grant CREATEROLE to the '
                           'migrating user, and upgrade again; nothing was changed';
        END;
    END LOOP;
END
$roles$;

"""


def dump(url: URL, *, exclude_schemas: tuple[str, ...] = ()) -> Dump:
    """The schema and data of the database at `url`, as a baseline would recreate them."""
    skip = [f"--exclude-schema={name}" for name in exclude_schemas]
    schema = _pg_dump(url, "--schema-only", *skip)
    clean = _pg_dump(url, "--schema-only", "--clean", "--if-exists", *skip)
    data = _pg_dump(url, "--data-only", "--inserts", "--column-inserts", *skip)
    created = set(schema.splitlines())
    # What --clean adds is the DROP of each object, dependants first; the schema of the version
    # table stays (it holds alembic_version, which env.py creates before any revision runs).
    drops = [
        line
        for line in clean.splitlines()
        if line not in created
        and not line.startswith("\\")
        and line != f"DROP SCHEMA IF EXISTS {VERSION_TABLE_SCHEMA};"
    ]
    return Dump(schema=schema, data=data, drops="\n".join(drops) + "\n")


def _upgrade_sql(found: Dump, roles: list[str]) -> str:
    schema = _runnable(found.schema).replace(
        f"CREATE SCHEMA {VERSION_TABLE_SCHEMA};",
        f"CREATE SCHEMA IF NOT EXISTS {VERSION_TABLE_SCHEMA};",
    )
    return _roles_sql(roles) + schema + "\n" + _runnable(found.data)


def comparable_lines(sql: str) -> list[str]:
    """pg_dump's statements without comments and psql meta-commands (a random key each run)."""
    return [line for line in sql.splitlines() if line and not line.startswith(("\\", "--"))]


def _slug(script: Script) -> str:
    return re.sub(r"[^a-z0-9]+", "_", f"baseline {script.revision}".lower()).strip("_")


def _revision_source(
    target: Script, squashed: list[Script], old_chain: str, supabase_number: int
) -> str:
    ids = "".join(f"    {s.revision!r},\n" for s in squashed)
    return textwrap.dedent(
        '''\
        """baseline: the schema at {rev}, squashed from {n} revisions

        Revision ID: {rev}
        Revises:

        Written by `heimdex db squash --to {rev}` from a replay of the history and pg_dump
        (the .upgrade.sql and .downgrade.sql files beside this one): regenerate, do not edit.
        """

        from __future__ import annotations

        from heimdex_db.baseline import execute_file, files_of

        revision = {rev!r}
        down_revision = None
        branch_labels = None
        depends_on = None
        supabase_slug = {slug!r}
        # Its file in supabase/migrations has the number of the last file it replaces.
        supabase_number = {number}
        # The revisions this one replaces, oldest first; the old chain that applies them, for a
        # database stamped with one of them.
        squashes = (
        {ids})
        old_chain = {old_chain!r}


        def upgrade() -> None:
            execute_file(files_of(__file__)[0])


        def downgrade() -> None:
            execute_file(files_of(__file__)[1])
        '''
    ).format(
        rev=target.revision,
        n=len(squashed),
        slug=_slug(target),
        ids=ids,
        old_chain=old_chain,
        number=supabase_number,
    )


def _old_chain_ini(ini: Path, main_ini: Path, script_location: Path) -> str:
    """An alembic.ini for the squashed revisions: the history's env.py, their own versions."""
    here = ini.parent
    rel = os.path.relpath(script_location, here)
    text_ = main_ini.read_text()
    text_ = re.sub(
        r"^script_location\s*=.*$",
        f"script_location = %(here)s/{rel}\nversion_locations = %(here)s/versions",
        text_,
        count=1,
        flags=re.MULTILINE,
    )
    main_here = os.path.relpath(main_ini.parent, here)
    return text_.replace("%(here)s/src", f"%(here)s/{main_here}/src")


def _check(ctx: DbContext, revision: str, replayed: Dump, server_url: URL | str | None) -> None:
    """The baseline, applied to a scratch database, dumps as the replayed history did."""
    with scratch_database(server_url) as url:
        migrate.upgrade(ctx.on(url, tuning=Tuning(retries=0)), revision)
        again = dump(url)
    for what, a, b in (
        ("schema", replayed.schema, again.schema),
        ("data", replayed.data, again.data),
    ):
        if comparable_lines(a) != comparable_lines(b):
            diff = "\n".join(
                difflib.unified_diff(
                    comparable_lines(a), comparable_lines(b), "replayed", "baseline", lineterm=""
                )
            )
            raise SquashFailed(
                f"the baseline does not recreate the {what} at {revision}; nothing was "
                f"changed:\n{diff}"
            )


def squash(ctx: DbContext, to: str, *, server_url: URL | str | None = None) -> SquashResult:
    """Replace the revisions from base to `to` by one baseline revision with `to`'s id.

    The chain is replayed on a scratch database (`server_url`, or a throwaway cluster) and
    dumped; the baseline is applied to another scratch database and must dump identically;
    only then are the files written and the squashed revisions moved to the old chain's
    directory. Raises `SquashFailed` (nothing changed) otherwise.
    """
    scripts = ctx.scripts()
    history = ordered_revisions(scripts)
    target = resolve_revision(scripts, to, also="head")
    if target is None:
        raise SquashFailed("squash --to needs a revision, not base")
    position = next(i for i, s in enumerate(history) if s.revision == target.revision)
    if position == 0:
        raise SquashFailed(f"{target.revision} is the first revision: there is nothing to squash")
    squashed = history[: position + 1]
    ids = {s.revision for s in squashed}
    earlier = [r for s in squashed for r in getattr(s.module, "squashes", ())]
    if earlier:
        raise SquashFailed(
            f"the history already starts with a baseline ({squashed[0].revision}): "
            "squashing a squashed history again is not supported"
        )
    tuning = Tuning(lock_timeout=ctx.tuning.lock_timeout, retries=0)

    with scratch_database(server_url) as url:
        existing = _all_roles(url)
        migrate.upgrade(ctx.on(url, tuning=tuning), target.revision)
        replayed = dump(url)
        # Those the history created, and those its grants and policies name (on a shared
        # server they may have existed before the replay).
        roles = sorted(set(_roles(url)) | (_all_roles(url) - existing))

    numbers = [int(a.name[:4]) for a in compile_artifacts(ctx.config) if a.revision in ids]
    versions = Path(target.path).parent
    script_location = Path(scripts.dir)
    old_dir = script_location / SQUASHED_DIR / target.revision
    if old_dir.exists():
        raise SquashFailed(f"{old_dir} exists already: remove it to squash again")
    baseline_py = versions / f"{target.revision}_{_slug(target)}.py"
    upgrade_sql, downgrade_sql = files_of(str(baseline_py))

    moved: list[tuple[Path, Path]] = []
    try:
        (old_dir / "versions").mkdir(parents=True)
        for script in squashed:
            src = Path(script.path)
            dst = old_dir / "versions" / src.name
            shutil.move(src, dst)
            moved.append((src, dst))
        old_ini = old_dir / "alembic.ini"
        old_ini.write_text(_old_chain_ini(old_ini, ctx.ini, script_location))
        upgrade_sql.write_text(_upgrade_sql(replayed, roles))
        downgrade_sql.write_text(_runnable(replayed.drops))
        old_chain = os.path.relpath(old_ini, versions)
        baseline_py.write_text(_revision_source(target, squashed, old_chain, max(numbers)))

        _check(ctx, target.revision, replayed, server_url)
    except BaseException:
        for src, dst in reversed(moved):
            shutil.move(dst, src)
        for path in (baseline_py, upgrade_sql, downgrade_sql):
            path.unlink(missing_ok=True)
        shutil.rmtree(old_dir, ignore_errors=True)
        raise
    return SquashResult(baseline_py, old_dir / "alembic.ini", [s.revision for s in squashed])
