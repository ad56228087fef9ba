"""Autogenerate fixes env.py applies to every generated revision (heimdex db or plain alembic).

alembic-postgresql-enum renders a VARCHAR -> enum change with `postgresql_using`, but a column
with a default still fails ("default for column ... cannot be cast automatically"), both ways:
the default must be dropped before the type change and set again after it.
"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate.rewriter import Rewriter
from alembic.migration import MigrationContext
from alembic.operations import ops
from sqlalchemy import DefaultClause, Enum, MetaData

rewriter = Rewriter()


def _model_default(context: MigrationContext, table: str, column: str) -> Any:
    metadata = context.opts.get("target_metadata")
    if not isinstance(metadata, MetaData) or table not in metadata.tables:
        return False
    col = metadata.tables[table].c.get(column)
    default = col.server_default if col is not None else None
    return default.arg if isinstance(default, DefaultClause) else False


@rewriter.rewrites(ops.AlterColumnOp)
def enum_change_around_default(
    context: MigrationContext, revision: Any, op: ops.AlterColumnOp
) -> ops.AlterColumnOp | list[ops.AlterColumnOp]:
    to_enum = isinstance(op.modify_type, Enum)
    from_enum = op.modify_type is not None and isinstance(op.existing_type, Enum)
    if not (to_enum or from_enum) or op.existing_server_default in (None, False):
        return op
    # Going to the enum, the default comes from the model; going back (the downgrade), it is
    # the one the column had before (reflected from the database at autogenerate time).
    default = (
        _model_default(context, op.table_name, op.column_name)
        if to_enum
        else op.existing_server_default
    )
    drop = ops.AlterColumnOp(
        op.table_name,
        op.column_name,
        schema=op.schema,
        existing_type=op.existing_type,
        existing_nullable=op.existing_nullable,
        modify_server_default=None,
    )
    op.existing_server_default = None
    restore = ops.AlterColumnOp(
        op.table_name,
        op.column_name,
        schema=op.schema,
        existing_type=op.modify_type,
        existing_nullable=op.existing_nullable,
        modify_server_default=default,
    )
    return [drop, op, restore]
