"""Revision SQL parsed by PostgreSQL's own parser (pglast), for every lint rule alike.

A statement is what PostgreSQL would run: comments, string literals and dollar-quoted text
are never read as SQL. The static statements in a DO block's body (PL/pgSQL) are statements
too, marked `in_do`: they run like any other, though the rules about a revision's own
transaction judge only the top-level ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pglast
from pglast import ast
from pglast.parser import ParseError

from heimdex.errors import HeimdexError
from heimdex_db.supabase.offline import Chunk, CompiledRevision

_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")


class UnparsableSql(HeimdexError):
    """SQL a revision emits that PostgreSQL's parser rejects (it would fail in the database)."""


@dataclass(frozen=True)
class Statement:
    node: ast.Node
    line: int
    autocommit: bool = False
    in_do: bool = False


def walk(node: Any) -> Iterator[ast.Node]:
    """`node` and every node below it."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, ast.Node):
            yield item
            stack.extend(getattr(item, attr) for attr in item)
        elif isinstance(item, tuple | list):
            stack.extend(item)


def relation_name(rel: ast.RangeVar | None) -> str:
    """The key a table is known by: its name as PostgreSQL folds it (one schema is assumed)."""
    return str(rel.relname) if rel is not None else ""


def qualified(names: Any) -> tuple[str | None, str]:
    """(schema, name) of a qualified name given as String nodes (`DROP TABLE`, `TypeName`)."""
    parts = [str(n.sval) for n in names if isinstance(n, ast.String)]
    return (parts[-2] if len(parts) > 1 else None, parts[-1])


def _first_token_line(sql: str, start: int, first_line: int) -> int:
    """The line of the first token at or after `start` that is not a comment."""
    offset = start
    try:
        for token in pglast.parser.scan(sql[start:]):
            if token.name not in ("SQL_COMMENT", "C_COMMENT"):
                offset = start + token.start
                break
    except ParseError:
        pass
    return first_line + sql.count("\n", 0, offset)


def _do_body(sql: str, stmt: ast.DoStmt) -> tuple[str, int] | None:
    """A DO block's body and its offset in `sql`, when it is dollar-quoted (it nearly always is)."""
    for item in stmt.args or ():
        if isinstance(item, ast.DefElem) and item.defname == "as":
            tag = _DOLLAR_TAG.match(sql, item.location or 0)
            if tag is None or not isinstance(item.arg, ast.String):
                return None
            return str(item.arg.sval), tag.end()
    return None


def _plpgsql_queries(tree: Any) -> Iterator[tuple[int, str]]:
    """(line in the body, query) of every static SQL statement in a PL/pgSQL parse tree."""
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            execsql = item.get("PLpgSQL_stmt_execsql")
            if isinstance(execsql, dict):
                query = execsql.get("sqlstmt", {}).get("PLpgSQL_expr", {}).get("query")
                if isinstance(query, str):
                    yield int(execsql.get("lineno", 1)), query
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _in_do(body: str, body_line: int, *, fixed_line: int | None) -> list[Statement]:
    # libpg_query parses PL/pgSQL only as a function's body; lineno 1 is the body's first line.
    wrapped = f"CREATE FUNCTION heimdex_lint() RETURNS void LANGUAGE plpgsql AS $lint${body}$lint$"
    try:
        tree = pglast.parse_plpgsql(wrapped)
    except ParseError:
        return []  # PostgreSQL checks a body when it runs it; there is nothing static to read
    found = []
    for lineno, query in _plpgsql_queries(tree):
        try:
            nodes = pglast.parse_sql(query)
        except ParseError:
            continue
        line = fixed_line if fixed_line is not None else body_line + lineno - 1
        found += [Statement(raw.stmt, line, in_do=True) for raw in nodes if raw.stmt]
    return found


def parse(
    sql: str,
    *,
    where: str,
    first_line: int = 1,
    fixed_line: int | None = None,
    autocommit: bool = False,
) -> list[Statement]:
    """The statements of `sql` (DO bodies' static statements after their DO).

    Each is at its own line in `sql` counted from `first_line`, or at `fixed_line` when all of
    `sql` comes from one place (a line of a revision). `where` names `sql` in a parse error.
    """
    try:
        raws = pglast.parse_sql(sql)
    except ParseError as exc:
        raise UnparsableSql(f"{where}: PostgreSQL cannot parse this SQL: {exc}") from None
    found: list[Statement] = []
    for raw in raws:
        if raw.stmt is None:
            continue
        start = raw.stmt_location or 0
        line = fixed_line if fixed_line is not None else _first_token_line(sql, start, first_line)
        found.append(Statement(raw.stmt, line, autocommit=autocommit))
        if isinstance(raw.stmt, ast.DoStmt) and (body := _do_body(sql, raw.stmt)) is not None:
            text, offset = body
            body_line = first_line + sql.count("\n", 0, offset)
            found += _in_do(text, body_line, fixed_line=fixed_line)
    return found


def chunk_statements(compiled: CompiledRevision, chunk: Chunk) -> list[Statement]:
    """The statements of one write of the revision's offline SQL, at its source line."""
    assert chunk.source_line is not None
    return parse(
        chunk.sql,
        where=f"{compiled.path}:{chunk.source_line}",
        fixed_line=chunk.source_line,
        autocommit=chunk.autocommit,
    )


def revision_statements(compiled: CompiledRevision) -> list[Statement]:
    """Every statement the revision's own code emits (not Alembic's bookkeeping), in order."""
    found: list[Statement] = []
    for chunk in compiled.chunks:
        if chunk.source_line is not None and chunk.sql:
            found += chunk_statements(compiled, chunk)
    return found
