"""`contract-in-expand`: an expand revision runs while the old code still does.

So it may only add. Dropping or renaming what the old code reads, or requiring a value the old
code does not write (SET NOT NULL on an existing table, a NOT NULL column without a default),
breaks the old code mid-deploy: that is a contract revision's work, after the deploy.
"""

from __future__ import annotations

from pathlib import Path

from alembic.script import Script
from pglast import ast
from pglast.enums import AlterTableType, ConstrType, ObjectType

from heimdex_db.lint.findings import Finding
from heimdex_db.lint.rules import Schema
from heimdex_db.lint.sql import Statement, qualified, relation_name
from heimdex_db.phases import PHASES, phase_of

CONTRACT_IN_EXPAND = "contract-in-expand"
PHASE_UNKNOWN = "phase-unknown"
_DROPPED = {
    ObjectType.OBJECT_TABLE: "table",
    ObjectType.OBJECT_VIEW: "view",
    ObjectType.OBJECT_MATVIEW: "materialized view",
    ObjectType.OBJECT_TYPE: "type",
    ObjectType.OBJECT_FUNCTION: "function",
    ObjectType.OBJECT_SEQUENCE: "sequence",
    ObjectType.OBJECT_SCHEMA: "schema",
}
_DEFAULTS = (ConstrType.CONSTR_DEFAULT, ConstrType.CONSTR_GENERATED, ConstrType.CONSTR_IDENTITY)


def _name(item: object) -> str:
    if isinstance(item, ast.ObjectWithArgs):
        return qualified(item.objname)[1]
    if isinstance(item, ast.TypeName):
        return qualified(item.names)[1]
    if isinstance(item, tuple | list):
        return qualified(item)[1]
    if isinstance(item, ast.String):
        return str(item.sval)
    return "?"


def _contract_ops(statement: Statement, existing: set[str]) -> list[str]:
    """What `statement` does that only a contract revision may."""
    node = statement.node
    ops: list[str] = []
    if isinstance(node, ast.DropStmt) and node.removeType in _DROPPED:
        kind = _DROPPED[node.removeType]
        ops += [f"drops {kind} {_name(item)}" for item in node.objects or ()]
    elif isinstance(node, ast.RenameStmt):
        what = relation_name(node.relation) if node.relation is not None else _name(node.object)
        old = f"{what}.{node.subname}" if node.subname else what
        ops.append(f"renames {old} to {node.newname}")
    elif isinstance(node, ast.AlterTableStmt) and node.objtype == ObjectType.OBJECT_TABLE:
        table = relation_name(node.relation)
        for cmd in node.cmds or ():
            if not isinstance(cmd, ast.AlterTableCmd):
                continue
            if cmd.subtype == AlterTableType.AT_DropColumn:
                ops.append(f"drops column {table}.{cmd.name}")
            elif cmd.subtype == AlterTableType.AT_SetNotNull and table in existing:
                ops.append(f"sets NOT NULL on {table}.{cmd.name}, which the old code may not write")
            elif cmd.subtype == AlterTableType.AT_AddColumn and isinstance(cmd.def_, ast.ColumnDef):
                kinds = {
                    c.contype for c in cmd.def_.constraints or () if isinstance(c, ast.Constraint)
                }
                if ConstrType.CONSTR_NOTNULL in kinds and not kinds.intersection(_DEFAULTS):
                    ops.append(
                        f"adds NOT NULL column {table}.{cmd.def_.colname} without a default, "
                        "which the old code does not write"
                    )
    return ops


def _phase_line(path: Path) -> int:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("phase"):
            return number
    return 1


def expand_findings(script: Script, upgrade: list[Statement], before: Schema) -> list[Finding]:
    """`phase-unknown` for a phase not in PHASES; `contract-in-expand` per contract operation."""
    path = Path(script.path)
    declared = getattr(script.module, "phase", None)
    if declared is not None and declared not in PHASES:
        return [
            Finding(
                path,
                _phase_line(path),
                PHASE_UNKNOWN,
                f"phase {declared!r} is not one of {', '.join(PHASES)}",
            )
        ]
    if phase_of(script) != "expand":
        return []
    return [
        Finding(
            path,
            statement.line,
            CONTRACT_IN_EXPAND,
            f"this expand revision {op}: the old code still runs during an expand; move it to a "
            'revision with phase = "contract", applied after the deploy',
        )
        for statement in upgrade
        for op in _contract_ops(statement, before.tables)
    ]
