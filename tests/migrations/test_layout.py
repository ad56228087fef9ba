"""What the deployment imports of `heimdex_common.migrations`: none of the developer tooling."""

from __future__ import annotations

import subprocess
import sys

TOOLING = (
    "pglast",
    "heimdex_common.migrations.lint",
    "heimdex_common.migrations.supabase",
    "heimdex_common.migrations.verify",
    "heimdex_common.migrations.migrate",
    "heimdex_common.migrations.cli",
)


def test_the_schema_check_imports_no_tooling() -> None:
    probe = (
        "import sys, heimdex_common.migrations.head\n"
        f"print(sorted(m for m in sys.modules if m.startswith({TOOLING!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_heimdex_db_loads_the_sql_parser_only_for_lint() -> None:
    # pglast is in the migrations extra: `heimdex db upgrade` runs where it is not installed.
    probe = "import sys, heimdex_common.migrations.cli\nprint('pglast' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
