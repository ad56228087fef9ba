"""A copy of the history to break on purpose, and the `heimdex` CLI run in this process or as a
real one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL

from heimdex_db.config import (
    VERSION_TABLE_SCHEMA,
    alembic_config,
)
from tests import inprocess as in_process

REPO = Path(__file__).resolve().parents[2]
COMMON = REPO / "packages" / "common"
HEIMDEX = Path(sys.executable).parent / "heimdex"
# Where env.py keeps Alembic's version table (moved out of `public` by the RLS revision's prelude).
VERSION_TABLE = f"{VERSION_TABLE_SCHEMA}.alembic_version"


@dataclass
class HistoryCopy:
    """packages/common/alembic and alembic.ini copied to a temporary directory."""

    root: Path

    @property
    def ini(self) -> Path:
        return self.root / "alembic.ini"

    @property
    def versions(self) -> Path:
        return self.root / "alembic" / "versions"

    @property
    def revisions(self) -> list[str]:
        """The copy's revision ids, oldest first (as they are now: added revisions included)."""
        return revisions_of(self.ini)

    @property
    def head(self) -> str:
        """The copy's single head: what a revision appended to the history revises."""
        return self.revisions[-1]

    def add_revision(
        self,
        rev: str,
        down: str,
        upgrade: str,
        downgrade: str = "pass",
        *,
        message: str | None = None,
        header: str = "",
    ) -> Path:
        """Append a revision; `upgrade`/`downgrade` are function bodies (dedented)."""
        body = textwrap.dedent(
            '''\
            """{message}

            Revision ID: {rev}
            Revises: {down}
            """

            from __future__ import annotations

            import sqlalchemy as sa
            from alembic import op

            revision = {rev!r}
            down_revision = {down!r}
            branch_labels = None
            depends_on = None
            {header}

            def upgrade() -> None:
            {upgrade}


            def downgrade() -> None:
            {downgrade}
            '''
        ).format(
            message=message or f"test revision {rev}",
            rev=rev,
            down=down,
            header=header,
            upgrade=textwrap.indent(textwrap.dedent(upgrade).strip(), "    "),
            downgrade=textwrap.indent(textwrap.dedent(downgrade).strip(), "    "),
        )
        path = self.versions / f"{rev}_test.py"
        path.write_text(body)
        return path

    def truncate_after(self, rev: str) -> None:
        """Remove the revisions after `rev`: the copy's head becomes `rev`."""
        scripts = ScriptDirectory.from_config(alembic_config(self.ini))
        for script in scripts.walk_revisions():
            if script.revision == rev:
                return
            Path(script.path).unlink()
        raise AssertionError(f"{rev} is not in the history copy")


def revisions_of(ini: Path | None = None) -> list[str]:
    """The revision ids of the history at `ini` (default: the repository's), oldest first."""
    scripts = ScriptDirectory.from_config(alembic_config(ini))
    heads = scripts.get_heads()
    assert len(heads) == 1, f"the history under test has several heads: {heads}"
    return [s.revision for s in reversed(list(scripts.walk_revisions()))]


def head() -> str:
    """The repository's head revision."""
    return revisions_of()[-1]


@pytest.fixture
def history(tmp_path: Path) -> HistoryCopy:
    root = tmp_path / "history"
    root.mkdir()
    shutil.copytree(
        COMMON / "alembic", root / "alembic", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(COMMON / "alembic.ini", root / "alembic.ini")
    return HistoryCopy(root)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without database settings or PYTHONPATH: only what a test passes."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PG") and k not in ("DATABASE_URL", "PYTHONPATH", "ALEMBIC_CONFIG")
    }
    env.update(extra)
    return env


def heimdex(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`heimdex ARGS` run in this process (tests/inprocess.py): the console script's entry
    function, options, settings and exit code, without an interpreter start and its imports.
    Where the process is the point (what the console script imports), `heimdex_process`."""
    return in_process.heimdex(*map(str, args), cwd=cwd or REPO, env=env or clean_env())


def heimdex_process(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`heimdex ARGS` as the console script, in a process of its own."""
    return subprocess.run(
        [str(HEIMDEX), *map(str, args)],
        cwd=cwd or REPO,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        check=False,
    )


def url_arg(url: URL) -> str:
    return url.render_as_string(hide_password=False)


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """A directory nobody may write to; root included (immutable), as `appuser` meets /app."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(directory)], check=True)
    else:
        directory.chmod(0o555)
    try:
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        else:
            directory.chmod(0o755)
