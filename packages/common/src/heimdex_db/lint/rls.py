"""Lint rule `table-without-rls`: a revision that creates a table in `public` enables RLS on it.

On Supabase every table in `public` is reachable through the Data API with the anon and
authenticated keys until row-level security says otherwise, so a new table must get
`ENABLE ROW LEVEL SECURITY` in the revision that creates it. The rule reads the revision's
offline SQL (`alembic upgrade prev:rev --sql`, exactly what the Supabase artifact holds), so it
judges what reaches the database, whichever Alembic operation or raw SQL produced it.
"""

from __future__ import annotations

from pathlib import Path

from pglast import ast
from pglast.enums import AlterTableType, ObjectType

from heimdex_db.lint.findings import RLS_BASELINE_REVISION, RLS_RULE, Finding
from heimdex_db.lint.sql import Statement, parse, qualified

RULE = RLS_RULE
__all__ = ["RLS_BASELINE_REVISION", "RULE", "check_rls", "rls_findings"]


def _public(schema: str | None, name: str) -> str | None:
    """`name` when the table lives in `public` (unqualified names do), else None."""
    return name if schema in (None, "public") else None


def _created(node: ast.Node) -> str | None:
    rel = None
    if isinstance(node, ast.CreateStmt):
        rel = node.relation
    elif isinstance(node, ast.CreateTableAsStmt) and node.into is not None:
        rel = node.into.rel if node.objtype == ObjectType.OBJECT_TABLE else None
    if rel is None or rel.relpersistence == "t":
        return None
    return _public(rel.schemaname, str(rel.relname))


def _enabled(node: ast.Node) -> str | None:
    if not isinstance(node, ast.AlterTableStmt) or node.relation is None:
        return None
    if node.objtype != ObjectType.OBJECT_TABLE:
        return None
    if not any(
        isinstance(cmd, ast.AlterTableCmd) and cmd.subtype == AlterTableType.AT_EnableRowSecurity
        for cmd in node.cmds or ()
    ):
        return None
    return _public(node.relation.schemaname, str(node.relation.relname))


def _dropped(node: ast.Node) -> set[str]:
    if not isinstance(node, ast.DropStmt) or node.removeType != ObjectType.OBJECT_TABLE:
        return set()
    return {t for names in node.objects or () if (t := _public(*qualified(names))) is not None}


def rls_findings(statements: list[Statement], path: Path) -> list[Finding]:
    """A finding for each table created in `public` and not given RLS (nor dropped) later on."""
    findings = []
    for i, statement in enumerate(statements):
        table = _created(statement.node)
        if table is None:
            continue
        later = [s.node for s in statements[i + 1 :]]
        if any(_enabled(n) == table or table in _dropped(n) for n in later):
            continue
        findings.append(
            Finding(
                path=path,
                line=statement.line,
                rule=RULE,
                message=(
                    f"table public.{table} is created without ENABLE ROW LEVEL SECURITY: "
                    "Supabase's Data API exposes it to anon and authenticated; enable RLS on it "
                    "in the same revision (with policies, or none for a backend-only table)"
                ),
            )
        )
    return findings


def check_rls(sql_text: str, *, filename: str) -> list[Finding]:
    """Findings for each `CREATE TABLE` in `public` not followed by `ENABLE ROW LEVEL SECURITY`.

    `sql_text` is one revision's offline SQL; `filename` names it in the findings. Temporary
    tables, tables of other schemas and tables dropped again in the same SQL are not flagged.
    """
    return rls_findings(parse(sql_text, where=filename), Path(filename))
