"""What importing the schema check costs an API replica: none of the developer tooling."""

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
