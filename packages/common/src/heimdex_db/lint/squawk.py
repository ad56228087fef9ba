"""squawk (squawk-cli) on one revision's offline SQL, its findings mapped to the revision's lines.

squawk treats a table created earlier in the same file as new, and every other table as
existing, which is exactly the schema before the revision.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pglast import ast

from heimdex.errors import HeimdexError
from heimdex_db.lint.findings import Finding
from heimdex_db.lint.sql import chunk_statements, relation_name
from heimdex_db.revision import EXTRA_HINT
from heimdex_db.supabase.offline import Chunk, CompiledRevision

# Squawk rules we do not run, and why. Everything else squawk reports is a finding.
SQUAWK_EXCLUDED: dict[str, str] = {
    "transaction-nesting": "Alembic's BEGIN/COMMIT around each revision is the transaction",
    "prefer-bigint-over-int": "column width is a schema choice, not a lock or a break",
    "prefer-bigint-over-smallint": "column width is a schema choice, not a lock or a break",
    "prefer-identity": "id generation is a schema choice, not a lock or a break",
    "prefer-text-field": "a varchar limit is a schema choice; changing it is changing-column-type",
    "prefer-robust-stmts": "revisions run once, in a transaction, under the migration lock",
    "require-statement-timeout": "our missing-lock-timeout rule; statement_timeout would abort "
    "long data migrations",
    "require-timeout-settings": "our missing-lock-timeout rule covers lock waits",
    "require-concurrent-index-creation": "our index-not-concurrent rule, which knows the tables "
    "that exist before the revision",
}


def squawk_binary() -> str:
    """squawk-cli installs a binary next to the interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "squawk"
    if beside.is_file():
        return str(beside)
    found = shutil.which("squawk")
    if found is None:
        raise HeimdexError(f"heimdex db lint needs squawk (squawk-cli): {EXTRA_HINT}")
    return found


def _target_table(compiled: CompiledRevision, chunk: Chunk) -> str | None:
    """The table an ALTER TABLE or CREATE INDEX of `chunk` works on."""
    for statement in chunk_statements(compiled, chunk):
        node = statement.node
        if isinstance(node, ast.AlterTableStmt | ast.IndexStmt):
            return relation_name(node.relation)
    return None


def squawk_findings(compiled: CompiledRevision, created_here: set[str]) -> list[Finding]:
    """squawk's findings, except on tables this revision creates (squawk only exempts some)."""
    if not any(c.source_line is not None and c.sql for c in compiled.chunks):
        return []
    with tempfile.TemporaryDirectory(prefix="heimdex-lint-") as tmp:
        sql_file = Path(tmp) / f"{compiled.revision}.sql"
        sql_file.write_text(compiled.text, encoding="utf-8")
        proc = subprocess.run(
            [
                squawk_binary(),
                "--reporter",
                "json",
                "--exclude",
                ",".join(sorted(SQUAWK_EXCLUDED)),
                str(sql_file),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    try:
        if not proc.stdout.strip() and proc.returncode != 0:
            raise json.JSONDecodeError("no output", "", 0)
        reported = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        raise HeimdexError(
            f"squawk failed on {compiled.revision}: {(proc.stderr or proc.stdout).strip()}"
        ) from None
    found = []
    for item in reported:
        line = int(item["line"]) + 1  # squawk counts from 0
        owner = next((c for c in reversed(compiled.chunks) if c.first_line <= line), None)
        if owner is None or owner.source_line is None:
            continue  # Alembic's own bookkeeping (alembic_version)
        if _target_table(compiled, owner) in created_here:
            continue  # nobody else can see a table this revision creates: no lock to fear
        found.append(
            Finding(Path(compiled.path), owner.source_line, item["rule_name"], item["message"])
        )
    return found
