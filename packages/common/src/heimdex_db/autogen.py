"""Autogenerate fixes env.py applies to every generated revision (heimdex db or plain alembic).

A new index on a table that already exists is built CONCURRENTLY, in an autocommit block (it
cannot run in a transaction), so that writers never wait for the build.

alembic-postgresql-enum renders a VARCHAR -> enum change with `postgresql_using`, but a column
with a default still fails ("default for column ... cannot be cast automatically"), both ways:
the default must be dropped before the type change and set again after it.
"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import renderers
from alembic.autogenerate.api import AutogenContext
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


class CreateIndexConcurrentlyOp(ops.CreateIndexOp):
    """CREATE INDEX CONCURRENTLY on an existing table, rendered in an autocommit block."""


@renderers.dispatch_for(CreateIndexConcurrentlyOp)
def _render_concurrent_index(autogen_context: AutogenContext, op: ops.CreateIndexOp) -> list[str]:
    plain = renderers.dispatch(ops.CreateIndexOp)(autogen_context, op)
    # Alembic's printer indents after a line ending in ":" and dedents at the empty line.
    return ["with op.get_context().autocommit_block():", plain, ""]


def _tables_created(revision: Any) -> set[str]:
    created: set[str] = set()
    for container in (
        getattr(revision, "upgrade_ops", None),
        getattr(revision, "downgrade_ops", None),
    ):
        for item in getattr(container, "ops", []) or []:
            if isinstance(item, ops.CreateTableOp):
                created.add(item.table_name)
    return created


@rewriter.rewrites(ops.CreateIndexOp)
def index_concurrently(
    context: MigrationContext, revision: Any, op: ops.CreateIndexOp
) -> ops.CreateIndexOp:
    if isinstance(op, CreateIndexConcurrentlyOp) or op.table_name in _tables_created(revision):
        return op
    kw = {**op.kw, "postgresql_concurrently": True}
    return CreateIndexConcurrentlyOp(
        op.index_name,
        op.table_name,
        op.columns,
        schema=op.schema,
        unique=op.unique,
        if_not_exists=op.if_not_exists,
        **kw,
    )
