"""A comparable snapshot of a database schema, read from the PostgreSQL catalogs."""

from __future__ import annotations

import difflib
from typing import Any

from sqlalchemy import Connection, text

Snapshot = dict[str, Any]

_QUERIES: dict[str, str] = {
    "tables": """
        SELECT c.relname, c.relkind::text, coalesce(obj_description(c.oid, 'pg_class'), '')
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = :schema AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
    """,
    "columns": """
        SELECT c.relname || '.' || a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull, coalesce(pg_get_expr(d.adbin, d.adrelid), ''),
               coalesce(col_description(c.oid, a.attnum), '')
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE n.nspname = :schema AND c.relkind IN ('r', 'p') AND a.attnum > 0
           AND NOT a.attisdropped
    """,
    "constraints": """
        SELECT c.relname || '.' || con.conname, pg_get_constraintdef(con.oid)
          FROM pg_constraint con
          JOIN pg_class c ON c.oid = con.conrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = :schema
    """,
    "indexes": """
        SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = :schema
    """,
    "enums": """
        SELECT t.typname, string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
          FROM pg_type t
          JOIN pg_enum e ON e.enumtypid = t.oid
          JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE n.nspname = :schema
         GROUP BY t.typname
    """,
    "row_security": """
        SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = :schema AND c.relkind IN ('r', 'p')
    """,
    # Normalised through acldefault(): "never granted" and "granted, then revoked" compare equal.
    "grants": """
        SELECT c.relname || '.' || CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                        ELSE pg_get_userbyid(a.grantee) END,
               string_agg(a.privilege_type, ',' ORDER BY a.privilege_type)
          FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
         CROSS JOIN LATERAL aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
         WHERE n.nspname = :schema AND c.relkind IN ('r', 'p', 'v', 'm')
           AND a.grantee <> c.relowner
         GROUP BY 1
    """,
    "column_grants": """
        SELECT c.relname || '.' || att.attname || '.'
               || CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
               string_agg(a.privilege_type, ',' ORDER BY a.privilege_type)
          FROM pg_attribute att
          JOIN pg_class c ON c.oid = att.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         CROSS JOIN LATERAL aclexplode(att.attacl) a
         WHERE n.nspname = :schema AND att.attnum > 0 AND NOT att.attisdropped
         GROUP BY 1
    """,
    # Storage parameters (a fillfactor): set by revisions, read by the heap as it fills pages.
    "storage": """
        SELECT c.relname, array_to_string(c.reloptions, ',')
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = :schema AND c.reloptions IS NOT NULL
    """,
    "policies": """
        SELECT tablename || '.' || policyname,
               cmd || ' ' || array_to_string(roles, ',') || ' using ' || coalesce(qual, '')
               || ' check ' || coalesce(with_check, '')
          FROM pg_policies WHERE schemaname = :schema
    """,
}


BOOKKEEPING = ("alembic_version",)
# Only the history expresses these (models cannot): compare them between databases, not with
# a schema built from the models.
HISTORY_ONLY = ("row_security", "grants", "column_grants", "policies", "storage")


def snapshot(
    connection: Connection, schema: str = "public", *, exclude: tuple[str, ...] = BOOKKEEPING
) -> Snapshot:
    """Tables, columns, constraints, indexes, enums, RLS flags, grants, storage parameters and
    policies of `schema`.

    Objects of the `exclude` tables (Alembic's own bookkeeping by default) are left out.
    """
    result: Snapshot = {}
    for kind, query in _QUERIES.items():
        rows = connection.execute(text(query), {"schema": schema}).all()
        result[kind] = {
            row[0]: tuple(row[1:])
            for row in rows
            if not any(
                row[0] == t or row[0].startswith(f"{t}.") or row[0].startswith(f"{t}_")
                for t in exclude
            )
        }
    return result


def without_history_only(snap: Snapshot) -> Snapshot:
    """What a schema built from the models can be compared on (HISTORY_ONLY left out)."""
    return {kind: objects for kind, objects in snap.items() if kind not in HISTORY_ONLY}


def diff(before: Snapshot, after: Snapshot) -> list[str]:
    """Human-readable differences, one line per changed object; empty when equal."""
    lines: list[str] = []
    for kind in sorted(set(before) | set(after)):
        old, new = before.get(kind, {}), after.get(kind, {})
        for name in sorted(set(old) | set(new)):
            if name not in new:
                lines.append(f"{kind}: {name} missing (was {old[name]})")
            elif name not in old:
                lines.append(f"{kind}: {name} left behind {new[name]}")
            elif old[name] != new[name]:
                lines.append(f"{kind}: {name} changed {old[name]} -> {new[name]}")
    return lines


def render_diff(before: Snapshot, after: Snapshot) -> str:
    a = [f"{k}: {n} {v}" for k in sorted(before) for n, v in sorted(before[k].items())]
    b = [f"{k}: {n} {v}" for k in sorted(after) for n, v in sorted(after[k].items())]
    return "\n".join(difflib.unified_diff(a, b, "expected", "actual", lineterm=""))
