"""Our own lint rules, on the parsed statements of one revision and the schema before it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic.script import Script
from pglast import ast
from pglast.enums import AlterTableType, ConstrType, ObjectType

from heimdex_db.lint.findings import Finding
from heimdex_db.lint.sql import Statement, qualified, relation_name, walk

# Defaults evaluated per row: ADD COLUMN with one of these rewrites the table (PostgreSQL 11+
# stores a non-volatile default in the catalog instead).
VOLATILE = frozenset(
    {
        "gen_random_uuid",
        "uuid_generate_v1",
        "uuid_generate_v4",
        "random",
        "clock_timestamp",
        "timeofday",
        "nextval",
    }
)
_VALIDATED = {
    ConstrType.CONSTR_CHECK: "CHECK",
    ConstrType.CONSTR_FOREIGN: "FOREIGN KEY",
    ConstrType.CONSTR_UNIQUE: "UNIQUE",
    ConstrType.CONSTR_PRIMARY: "PRIMARY KEY",
}
_DEFAULTS = (ConstrType.CONSTR_DEFAULT, ConstrType.CONSTR_GENERATED, ConstrType.CONSTR_IDENTITY)
_VALIDATE = AlterTableType.AT_ValidateConstraint
_ALWAYS_STRONG = (ast.LockStmt, ast.TruncateStmt, ast.CreateTrigStmt, ast.ClusterStmt)
_RENAMED_RELATIONS = (
    ObjectType.OBJECT_TABLE,
    ObjectType.OBJECT_COLUMN,
    ObjectType.OBJECT_TABCONSTRAINT,
    ObjectType.OBJECT_INDEX,
)


@dataclass
class Schema:
    """The tables and enum types that exist, as far as the SQL read so far says."""

    tables: set[str] = field(default_factory=set)
    enums: set[str] = field(default_factory=set)

    def apply(self, statements: Iterable[Statement]) -> None:
        for statement in statements:
            node = statement.node
            if isinstance(node, ast.CreateStmt):
                self.tables.add(relation_name(node.relation))
            elif isinstance(node, ast.CreateTableAsStmt) and node.into is not None:
                if node.objtype == ObjectType.OBJECT_TABLE:
                    self.tables.add(relation_name(node.into.rel))
            elif isinstance(node, ast.RenameStmt) and node.renameType == ObjectType.OBJECT_TABLE:
                self.tables.discard(relation_name(node.relation))
                self.tables.add(str(node.newname))
            elif isinstance(node, ast.CreateEnumStmt):
                self.enums.add(qualified(node.typeName)[1])
            elif isinstance(node, ast.DropStmt) and node.removeType == ObjectType.OBJECT_TABLE:
                self.tables.difference_update(qualified(names)[1] for names in node.objects or ())
            elif isinstance(node, ast.DropStmt) and node.removeType == ObjectType.OBJECT_TYPE:
                self.enums.difference_update(
                    qualified(t.names)[1] for t in node.objects or () if isinstance(t, ast.TypeName)
                )


def _alter_commands(node: ast.AlterTableStmt) -> list[ast.AlterTableCmd]:
    return [c for c in node.cmds or () if isinstance(c, ast.AlterTableCmd)]


def _type_name(column: ast.ColumnDef) -> str:
    return qualified(column.typeName.names if column.typeName is not None else ())[1]


def _constraints(column: ast.ColumnDef) -> list[ast.Constraint]:
    return [c for c in column.constraints or () if isinstance(c, ast.Constraint)]


def _alter_findings(
    path: Path, statement: Statement, existing: set[str], enums: set[str]
) -> list[Finding]:
    """What one ALTER TABLE does to a table, command by command."""
    node = statement.node
    if not isinstance(node, ast.AlterTableStmt) or node.objtype != ObjectType.OBJECT_TABLE:
        return []
    table = relation_name(node.relation)
    line = statement.line
    found = []
    for cmd in _alter_commands(node):
        column = cmd.def_ if isinstance(cmd.def_, ast.ColumnDef) else None
        if cmd.subtype == AlterTableType.AT_AlterColumnType and column is not None:
            new_type = _type_name(column)
            if new_type in enums and column.raw_default is None:
                found.append(
                    Finding(
                        path,
                        line,
                        "enum-without-using",
                        f"{table}.{cmd.name} changed to enum {new_type} without USING: "
                        "PostgreSQL cannot cast it automatically "
                        f"(postgresql_using='{cmd.name}::{new_type}')",
                    )
                )
        if table not in existing:
            continue  # nobody else can see a table this revision creates: no lock to fear
        if cmd.subtype == AlterTableType.AT_AddColumn and column is not None:
            kinds = {c.contype for c in _constraints(column)}
            if ConstrType.CONSTR_NOTNULL in kinds and not kinds.intersection(_DEFAULTS):
                found.append(
                    Finding(
                        path,
                        line,
                        "not-null-without-default",
                        f"NOT NULL column {table}.{column.colname} added to an existing "
                        "table without a default fails on any existing row",
                    )
                )
        rewrites = cmd.subtype == AlterTableType.AT_AlterColumnType or (
            cmd.subtype == AlterTableType.AT_AddColumn
            and any(
                isinstance(n, ast.FuncCall) and qualified(n.funcname)[1] in VOLATILE
                for n in walk(column)
            )
        )
        if rewrites:
            verb = "ALTER" if cmd.subtype == AlterTableType.AT_AlterColumnType else "ADD"
            found.append(
                Finding(
                    path,
                    line,
                    "table-rewrite",
                    f"{verb} on {table} rewrites the table under ACCESS EXCLUSIVE: add a column "
                    "of the new type, backfill it with online.backfill and swap "
                    "(docs/migrations.md)",
                )
            )
        constraint = cmd.def_ if isinstance(cmd.def_, ast.Constraint) else None
        if (
            cmd.subtype == AlterTableType.AT_AddConstraint
            and constraint is not None
            and constraint.contype in _VALIDATED
            and not constraint.skip_validation
            and not constraint.indexname
        ):
            found.append(
                Finding(
                    path,
                    line,
                    "validation-under-lock",
                    f"{_VALIDATED[constraint.contype]} on {table} is checked against every row "
                    "under the ALTER's lock: add it NOT VALID and VALIDATE it apart "
                    "(online.add_check / add_foreign_key)",
                )
            )
        if cmd.subtype == AlterTableType.AT_SetNotNull:
            found.append(
                Finding(
                    path,
                    line,
                    "validation-under-lock",
                    f"SET NOT NULL on {table} scans every row under ACCESS EXCLUSIVE unless "
                    "a validated CHECK (col IS NOT NULL) proves it: add that check first",
                )
            )
    return found


def _updated_table(node: ast.Node) -> str | None:
    """The table an UPDATE changes, alone or as a CTE of the statement."""
    if isinstance(node, ast.UpdateStmt):
        return relation_name(node.relation)
    with_clause = getattr(node, "withClause", None)
    for cte in getattr(with_clause, "ctes", None) or ():
        if isinstance(cte, ast.CommonTableExpr) and isinstance(cte.ctequery, ast.UpdateStmt):
            return relation_name(cte.ctequery.relation)
    return None


def _has_limit(node: ast.Node) -> bool:
    return any(isinstance(n, ast.SelectStmt) and n.limitCount is not None for n in walk(node))


def _has_option(options: tuple[Any, ...] | None, name: str) -> bool:
    return any(isinstance(o, ast.DefElem) and o.defname == name for o in options or ())


def takes_strong_lock(node: ast.Node) -> bool:
    """ACCESS EXCLUSIVE (or SHARE ROW EXCLUSIVE) on a table or index that exists."""
    if isinstance(node, ast.AlterTableStmt):
        strong = node.objtype == ObjectType.OBJECT_INDEX or (
            node.objtype == ObjectType.OBJECT_TABLE
            and any(
                c.subtype != AlterTableType.AT_ValidateConstraint for c in _alter_commands(node)
            )
        )
    elif isinstance(node, ast.RenameStmt):
        strong = node.renameType in _RENAMED_RELATIONS
    elif isinstance(node, ast.AlterObjectSchemaStmt):
        strong = node.objectType == ObjectType.OBJECT_TABLE
    elif isinstance(node, ast.DropStmt):
        strong = node.removeType == ObjectType.OBJECT_TABLE
    elif isinstance(node, ast.VacuumStmt):
        strong = _has_option(node.options, "full")
    elif isinstance(node, ast.ReindexStmt):
        strong = not _has_option(node.params, "concurrently")
    else:
        strong = isinstance(
            node, ast.LockStmt | ast.TruncateStmt | ast.CreateTrigStmt | ast.ClusterStmt
        )
    return strong


def _online_findings(path: Path, statement: Statement, existing: set[str]) -> list[Finding]:
    """What breaks the online promise outside ALTER TABLE: long row locks, unguarded DDL."""
    node, line = statement.node, statement.line
    found = []
    updated = _updated_table(node)
    if updated is not None and updated in existing and not _has_limit(node):
        found.append(
            Finding(
                path,
                line,
                "backfill-in-one-statement",
                f"UPDATE of {updated} in one statement locks every row it touches until the "
                "revision commits: batch it (online.backfill)",
            )
        )
    if statement.autocommit and takes_strong_lock(node):
        found.append(
            Finding(
                path,
                line,
                "missing-lock-timeout",
                "outside the revision's transaction SET LOCAL lock_timeout does not apply: "
                "run this through online.ddl(), which sets it and retries",
            )
        )
    return found


def _index_finding(path: Path, statement: Statement, existing: set[str]) -> list[Finding]:
    node = statement.node
    if not isinstance(node, ast.IndexStmt) or node.concurrent:
        return []
    table = relation_name(node.relation)
    if table not in existing:
        return []
    return [
        Finding(
            path,
            statement.line,
            "index-not-concurrent",
            f"CREATE INDEX on existing table {table} without CONCURRENTLY blocks its writes "
            "while the index builds (use op.create_index(..., postgresql_concurrently=True) in "
            "an autocommit_block)",
        )
    ]


def _sets_lock_timeout(statement: Statement) -> bool:
    node = statement.node
    return isinstance(node, ast.VariableSetStmt) and node.name == "lock_timeout"


def own_rules(
    script: Script,
    upgrade: list[Statement],
    downgrade: list[Statement],
    before: Schema,
) -> list[Finding]:
    """Every finding of our rules on one revision, given the schema before it."""
    path = Path(script.path)
    created_here = Schema()
    created_here.apply(upgrade)
    enums = before.enums | created_here.enums
    existing = before.tables
    found: list[Finding] = []
    for statement in upgrade:
        if statement.in_do:
            continue
        found += _index_finding(path, statement, existing)
        found += _alter_findings(path, statement, existing, enums)
        found += _online_findings(path, statement, existing)

    left = Schema(enums=set(created_here.enums))
    left.apply(s for s in downgrade if isinstance(s.node, ast.DropStmt))
    for statement in upgrade:
        node = statement.node
        if isinstance(node, ast.CreateEnumStmt) and qualified(node.typeName)[1] in left.enums:
            found.append(
                Finding(
                    path,
                    statement.line,
                    "enum-not-dropped",
                    f"enum {qualified(node.typeName)[1]} created in upgrade is not dropped in "
                    "downgrade (a re-upgrade would fail on CREATE TYPE)",
                )
            )

    for direction, statements in (("upgrade", upgrade), ("downgrade", downgrade)):
        top = [s for s in statements if not s.in_do]
        if top and not _sets_lock_timeout(top[0]):
            fn = getattr(script.module, direction, None)
            code = getattr(fn, "__code__", None)
            found.append(
                Finding(
                    path,
                    code.co_firstlineno if code is not None else 1,
                    "missing-lock-timeout",
                    f'{direction}() does not start with op.execute("SET LOCAL lock_timeout = '
                    "'5s'\"): a DDL queued behind a long transaction would block every writer",
                )
            )
    return found
