"""What a downgrade would delete: the tables and columns its SQL drops, with their data counted.

The downgrade's offline SQL (`alembic downgrade rev:prev --sql`) is read with PostgreSQL's own
parser, so what counts is what the revision really emits (`op.drop_table`, `op.drop_column`,
raw `DROP TABLE`, statements in DO blocks), not what its code looks like. The rows are then
counted on the live database, before anything is changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from alembic.config import Config
from alembic.script import Script
from pglast import ast
from pglast.enums.parsenodes import AlterTableType, ObjectType
from sqlalchemy import Connection, text

from heimdex.errors import HeimdexError
from heimdex_db import migrate
from heimdex_db.context import DbContext
from heimdex_db.lint.sql import revision_statements
from heimdex_db.supabase.offline import compile_revision

logger = logging.getLogger(__name__)


class DataLossRefused(HeimdexError):
    """A downgrade would delete rows or values and `allow_data_loss` was not given."""


@dataclass(frozen=True)
class Drop:
    """A table (`column` None) or a column a downgrade drops, and the revision that does it."""

    revision: str
    schema: str | None
    table: str
    column: str | None = None

    @property
    def name(self) -> str:
        table = f"{self.schema}.{self.table}" if self.schema else self.table
        return f"{table}.{self.column}" if self.column else table


@dataclass(frozen=True)
class Loss:
    """A `Drop` and how much it would delete: rows of a table, non-null values of a column."""

    drop: Drop
    count: int

    def render(self) -> str:
        if self.drop.column is None:
            return (
                f"table {self.drop.name}: {self.count} row(s) (dropped by the downgrade of "
                f"{self.drop.revision})"
            )
        return (
            f"column {self.drop.name}: {self.count} non-null value(s) (dropped by the "
            f"downgrade of {self.drop.revision})"
        )


def _names(items: object) -> tuple[str | None, str]:
    parts = [str(n.sval) for n in items if isinstance(n, ast.String)]  # type: ignore[attr-defined]
    return (parts[-2] if len(parts) > 1 else None, parts[-1])


def drops_of(cfg: Config, script: Script) -> list[Drop]:
    """The tables and columns the downgrade of `script` drops, in the order it drops them."""
    found: list[Drop] = []
    for statement in revision_statements(compile_revision(cfg, script, direction="downgrade")):
        node = statement.node
        if isinstance(node, ast.DropStmt) and node.removeType == ObjectType.OBJECT_TABLE:
            for names in node.objects or ():
                schema, table = _names(names)
                found.append(Drop(script.revision, schema, table))
        elif isinstance(node, ast.AlterTableStmt) and node.relation is not None:
            rel = node.relation
            for cmd in node.cmds or ():
                drops_column = cmd.subtype == AlterTableType.AT_DropColumn
                if isinstance(cmd, ast.AlterTableCmd) and drops_column:
                    found.append(
                        Drop(script.revision, rel.schemaname, str(rel.relname), str(cmd.name))
                    )
    return found


def _quote(conn: Connection, name: str) -> str:
    return str(conn.execute(text("SELECT quote_ident(:n)"), {"n": name}).scalar_one())


def count(conn: Connection, drop: Drop) -> int | None:
    """Rows of the table, or non-null values of the column; None when it does not exist."""
    schema = drop.schema or "public"
    exists = conn.execute(
        text(
            "SELECT EXISTS (SELECT FROM information_schema.columns"
            " WHERE table_schema = :s AND table_name = :t"
            " AND (CAST(:c AS text) IS NULL OR column_name = :c))"
        ),
        {"s": schema, "t": drop.table, "c": drop.column},
    ).scalar_one()
    if not exists:
        return None
    relation = f"{_quote(conn, schema)}.{_quote(conn, drop.table)}"
    what = "*" if drop.column is None else _quote(conn, drop.column)
    return int(conn.execute(text(f"SELECT count({what}) FROM {relation}")).scalar_one())


def losses(cfg: Config, conn: Connection, scripts: list[Script]) -> list[Loss]:
    """What downgrading `scripts` (newest first, as they would run) would delete on `conn`.

    Only drops that delete something are returned; a column of a table the same downgrade
    drops is counted with the table, not again on its own.
    """
    drops = [drop for script in scripts for drop in drops_of(cfg, script)]
    tables = {(d.schema or "public", d.table) for d in drops if d.column is None}
    found: list[Loss] = []
    seen: set[Drop] = set()
    for drop in drops:
        key = Drop("", drop.schema or "public", drop.table, drop.column)
        if key in seen:
            continue
        seen.add(key)
        if drop.column is not None and (drop.schema or "public", drop.table) in tables:
            continue
        n = count(conn, drop)
        if n:
            found.append(Loss(drop, n))
    return found


def refusal(target: str, found: list[Loss]) -> DataLossRefused:
    lines = "\n".join(f"  {loss.render()}" for loss in found)
    return DataLossRefused(
        f"the downgrade to {target} would delete data; nothing was changed "
        f"(pass --allow-data-loss to delete it):\n{lines}"
    )


def downgrade(
    ctx: DbContext, target: str, *, allow_data_loss: bool = False
) -> migrate.MigrateResult:
    """`heimdex db downgrade`: `migrate.downgrade`, refused when it would delete data.

    Under the migration lock and before any revision runs, the tables and columns the
    downgrade drops are counted; any that holds rows (non-null values for a column) makes it
    raise `DataLossRefused` naming each, unless `allow_data_loss`, which logs them and goes on.
    """

    def guard(conn: Connection, scripts: list[Script]) -> None:
        found = losses(ctx.config, conn, scripts)
        if found and not allow_data_loss:
            raise refusal(target, found)
        for loss in found:
            logger.warning(
                "deleting %s",
                loss.render(),
                extra={"action": "db.downgrade.data_loss", "revision": loss.drop.revision},
            )

    return migrate.downgrade(ctx, target, guard=guard)
