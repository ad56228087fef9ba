"""What the deployment imports of `heimdex_db`: none of the developer tooling."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # Python processes probing imports

TOOLING = (
    "pglast",
    "heimdex_db.lint",
    "heimdex_db.supabase",
    "heimdex_db.verify",
    "heimdex_db.migrate",
    "heimdex_db.cli",
)


def test_the_schema_check_imports_no_tooling() -> None:
    probe = (
        "import sys, heimdex_db.head\n"
        f"print(sorted(m for m in sys.modules if m.startswith({TOOLING!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_heimdex_db_loads_the_sql_parser_only_for_lint() -> None:
    # pglast is in the tooling extra: `heimdex db upgrade` runs where it is not installed.
    probe = "import sys, heimdex_db.cli\nprint('pglast' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
