"""Lint rule `table-without-rls`: a revision that creates a table in `public` enables RLS on it.

On Supabase every table in `public` is reachable through the Data API with the anon and
authenticated keys until row-level security says otherwise, so a new table must get
`ENABLE ROW LEVEL SECURITY` in the revision that creates it. The rule reads the revision's
offline SQL (`alembic upgrade prev:rev --sql`, exactly what the Supabase artifact holds), so it
judges what reaches the database, whichever Alembic operation or raw SQL produced it.
"""

from __future__ import annotations

import re
from pathlib import Path

from heimdex_common.migrations.lint.findings import Finding

RULE = "table-without-rls"
# Revisions up to this one predate the rule (this one brings RLS to the tables they created).
RLS_BASELINE_REVISION = "7e5b3c8d1f20"

_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_NAME = rf"(?P<first>{_IDENT})(?:\s*\.\s*(?P<second>{_IDENT}))?"
_CREATE = re.compile(
    r"\bCREATE\s+(?:(?:GLOBAL|LOCAL)\s+)?(?P<temp>(?:TEMPORARY|TEMP)\s+)?(?:UNLOGGED\s+)?"
    rf"TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?{_NAME}",
    re.IGNORECASE,
)
_ENABLE = re.compile(
    rf"\bALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?{_NAME}[^;]*?"
    r"\bENABLE\s+ROW\s+LEVEL\s+SECURITY\b",
    re.IGNORECASE,
)
_DOLLAR = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")
_DROP = re.compile(rf"\bDROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?{_NAME}", re.IGNORECASE)


def _mask(sql: str) -> str:
    """`sql` with comments and single-quoted literals blanked, offsets and newlines kept.

    Dollar-quoted bodies are kept (masked the same way): a DO block's statements run like any
    other.
    """
    out = list(sql)
    i, n = 0, len(sql)

    def blank(start: int, end: int) -> None:
        for k in range(start, min(end, n)):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end == -1 else end
            blank(i, end)
            i = end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end == -1 else end + 2
            blank(i, end)
            i = end
        elif sql[i] == "$" and (i == 0 or not (sql[i - 1].isalnum() or sql[i - 1] == "_")):
            tag = _DOLLAR.match(sql, i)
            close = sql.find(tag.group(), tag.end()) if tag else -1
            if tag is None or close == -1:
                i += 1
                continue
            out[tag.end() : close] = _mask(sql[tag.end() : close])
            i = close + len(tag.group())
        elif sql[i] == "'":
            j = i + 1
            while j < n:
                if sql[j] == "'" and sql.startswith("''", j):
                    j += 2
                    continue
                if sql[j] == "'":
                    break
                j += 1
            blank(i, j + 1)
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _unquote(ident: str) -> str:
    if ident.startswith('"'):
        return ident[1:-1].replace('""', '"')
    return ident.lower()


def _public_table(match: re.Match[str]) -> str | None:
    """The table's name when it lives in `public` (unqualified names do), else None."""
    first, second = match.group("first"), match.group("second")
    if second is None:
        return _unquote(first)
    return _unquote(second) if _unquote(first) == "public" else None


def check_rls(sql_text: str, *, filename: str) -> list[Finding]:
    """Findings for each `CREATE TABLE` in `public` not followed by `ENABLE ROW LEVEL SECURITY`.

    `sql_text` is one revision's offline SQL; `filename` names it in the findings. Temporary
    tables, tables of other schemas and tables dropped again in the same SQL are not flagged.
    """
    masked = _mask(sql_text)
    findings: list[Finding] = []
    for create in _CREATE.finditer(masked):
        if create.group("temp"):
            continue
        table = _public_table(create)
        if table is None:
            continue
        after = create.end()
        if any(_public_table(m) == table for m in _ENABLE.finditer(masked, after)):
            continue
        if any(_public_table(m) == table for m in _DROP.finditer(masked, after)):
            continue
        findings.append(
            Finding(
                path=Path(filename),
                line=masked.count("\n", 0, create.start()) + 1,
                rule=RULE,
                message=(
                    f"table public.{table} is created without ENABLE ROW LEVEL SECURITY: "
                    "Supabase's Data API exposes it to anon and authenticated; enable RLS on it "
                    "in the same revision (with policies, or none for a backend-only table)"
                ),
            )
        )
    return findings
