"""Files the Supabase CLI cannot apply: a statement that must run alone, sharing its file.

`supabase db push` sends each file of supabase/migrations as one batch, in one transaction with
its `supabase_migrations.schema_migrations` insert; a statement PostgreSQL refuses inside a
transaction (CREATE INDEX CONCURRENTLY, ...) runs only when it is the file's one statement
(Supabase CLI >= 2.109; DROP INDEX CONCURRENTLY since 2.115). The compiler gives each such
statement a file of its own; this finds the files where that is not so.
"""

from __future__ import annotations

import pglast
from pglast import ast
from pglast.parser import ParseError


def _outside_transaction(node: ast.Node) -> str | None:
    """What `node` is, when PostgreSQL refuses it in a transaction block."""
    kinds = {
        "CREATE INDEX CONCURRENTLY": isinstance(node, ast.IndexStmt) and bool(node.concurrent),
        "DROP INDEX CONCURRENTLY": isinstance(node, ast.DropStmt) and bool(node.concurrent),
        "REINDEX CONCURRENTLY": isinstance(node, ast.ReindexStmt)
        and any(
            isinstance(p, ast.DefElem) and p.defname == "concurrently" for p in node.params or ()
        ),
        "VACUUM": isinstance(node, ast.VacuumStmt) and bool(node.is_vacuumcmd),
        "CREATE/DROP DATABASE": isinstance(node, ast.CreatedbStmt | ast.DropdbStmt),
        "ALTER SYSTEM": isinstance(node, ast.AlterSystemStmt),
    }
    return next((kind for kind, found in kinds.items() if found), None)


def mixed_batch(sql: str) -> str | None:
    """Why the Supabase CLI cannot apply `sql` as one file, or None when it can.

    SQL that does not parse is left to the database to refuse (None).
    """
    try:
        statements = [raw.stmt for raw in pglast.parse_sql(sql) if raw.stmt is not None]
    except ParseError:
        return None
    if len(statements) < 2:
        return None
    for node in statements:
        kind = _outside_transaction(node)
        if kind is not None:
            return (
                f"{kind} shares the file with {len(statements) - 1} other statement(s); "
                "the Supabase CLI runs a file in one transaction, where it cannot run: "
                "give it a file of its own (an autocommit_block() in the revision)"
            )
    return None
