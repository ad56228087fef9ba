"""`heimdex db lint`: SQL that locks or breaks a live database, found before it ships.

Each revision's upgrade SQL is compiled offline (no database) and checked twice:

- by squawk, on that revision's SQL alone: squawk treats a table created earlier in the same
  file as new, and every other table as existing, which is exactly the schema before the
  revision;
- by our own rules, which know the schema before the revision from the SQL of the revisions
  before it (tables and enum types created, dropped and renamed);
- by `table-without-rls` (lint.rls), on the revisions after the one that brought RLS to the
  ledger: a table created in `public` gets row-level security in the same revision.

A finding is reported at the line of the revision's source that emitted the statement, so a
comment on or just above that line acknowledges it:

    # heimdex-lint: ignore[index-not-concurrent] job is rewritten in this transaction anyway
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from alembic.script import Script

from heimdex_common.errors import HeimdexError
from heimdex_common.migrations.context import DbContext
from heimdex_common.migrations.history import ordered_revisions, resolve_revision
from heimdex_common.migrations.lint.findings import Finding
from heimdex_common.migrations.lint.rls import RLS_BASELINE_REVISION, check_rls
from heimdex_common.migrations.revision import EXTRA_HINT
from heimdex_common.migrations.supabase.offline import Chunk, CompiledRevision, compile_revision

logger = logging.getLogger(__name__)

# Squawk rules we do not run, and why. Everything else squawk reports is a finding.
SQUAWK_EXCLUDED: dict[str, str] = {
    "transaction-nesting": "Alembic's BEGIN/COMMIT around each revision is the transaction",
    "prefer-bigint-over-int": "column width is a schema choice, not a lock or a break",
    "prefer-bigint-over-smallint": "column width is a schema choice, not a lock or a break",
    "prefer-identity": "id generation is a schema choice, not a lock or a break",
    "prefer-text-field": "a varchar limit is a schema choice; changing it is changing-column-type",
    "prefer-robust-stmts": "revisions run once, in a transaction, under the migration lock",
    "require-statement-timeout": "our missing-lock-timeout rule; statement_timeout would abort "
    "long data migrations",
    "require-timeout-settings": "our missing-lock-timeout rule covers lock waits",
    "require-concurrent-index-creation": "our index-not-concurrent rule, which knows the tables "
    "that exist before the revision",
}
OWN_RULES = (
    "enum-without-using",
    "enum-not-dropped",
    "index-not-concurrent",
    "not-null-without-default",
    "missing-lock-timeout",
    "table-without-rls",
    "table-rewrite",
    "validation-under-lock",
    "backfill-in-one-statement",
)
# Defaults evaluated per row: ADD COLUMN with one of these rewrites the table (PostgreSQL 11+
# stores a non-volatile default in the catalog instead).
_VOLATILE = r"\b(gen_random_uuid|uuid_generate_v[14]|random|clock_timestamp|timeofday|nextval)\s*\("
# Statements that take ACCESS EXCLUSIVE (or SHARE ROW EXCLUSIVE) on a table that exists.
_STRONG = re.compile(
    r"^(ALTER TABLE (?!\S+ VALIDATE CONSTRAINT)|LOCK (TABLE )?|DROP TABLE|TRUNCATE|"
    r"CREATE (OR REPLACE )?TRIGGER|ALTER INDEX|CLUSTER|VACUUM FULL|REINDEX (?!.*CONCURRENTLY))",
    re.I,
)
MARKER = re.compile(r"#\s*heimdex-lint:\s*ignore\[([^\]]*)\](.*)$")
_IDENT = r'(?:"[^"]+"|[\w$]+)(?:\.(?:"[^"]+"|[\w$]+))?'


@dataclass
class LintReport:
    findings: list[Finding] = field(default_factory=list)
    acknowledged: int = 0
    revisions: int = 0


@dataclass
class _Schema:
    tables: set[str] = field(default_factory=set)
    enums: set[str] = field(default_factory=set)


def _name(raw: str) -> str:
    """`public."Job"` -> `job`-style key: schema dropped (one schema), quotes removed."""
    last = raw.rsplit(".", maxsplit=1)[-1]
    return last[1:-1] if last.startswith('"') else last.lower()


def _split_top_level(body: str) -> list[str]:
    """Split on commas outside parentheses and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(body):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return [p.strip() for p in parts if p.strip()]


def _statements(compiled: CompiledRevision) -> list[Chunk]:
    return [
        c
        for c in compiled.chunks
        if c.source_line is not None and c.sql and not c.sql.startswith("--")
    ]


def _apply_to_schema(schema: _Schema, sql: str) -> None:
    flat = " ".join(sql.split())
    for m in re.finditer(rf"CREATE TABLE (?:IF NOT EXISTS )?({_IDENT})", flat, re.I):
        schema.tables.add(_name(m.group(1)))
    for m in re.finditer(rf"DROP TABLE (?:IF EXISTS )?({_IDENT})", flat, re.I):
        schema.tables.discard(_name(m.group(1)))
    for m in re.finditer(
        rf"ALTER TABLE (?:IF EXISTS )?({_IDENT}) RENAME TO ({_IDENT})", flat, re.I
    ):
        schema.tables.discard(_name(m.group(1)))
        schema.tables.add(_name(m.group(2)))
    for m in re.finditer(rf"CREATE TYPE ({_IDENT}) AS ENUM", flat, re.I):
        schema.enums.add(_name(m.group(1)))
    for m in re.finditer(rf"DROP TYPE (?:IF EXISTS )?({_IDENT})", flat, re.I):
        schema.enums.discard(_name(m.group(1)))


def _alter_findings(
    flat: str, line: int, existing: set[str], enums: set[str]
) -> list[tuple[int, str, str]]:
    """enum-without-using and not-null-without-default, clause by clause of an ALTER TABLE."""
    found: list[tuple[int, str, str]] = []
    alter = re.match(rf"ALTER TABLE (?:IF EXISTS )?(?:ONLY )?({_IDENT}) (.*?);?$", flat, re.I)
    if not alter:
        return found
    table = _name(alter.group(1))
    for clause in _split_top_level(alter.group(2)):
        col_type = re.match(
            rf"ALTER (?:COLUMN )?({_IDENT}) (?:SET DATA )?TYPE ({_IDENT})", clause, re.I
        )
        if (
            col_type
            and _name(col_type.group(2)) in enums
            and not re.search(r"\bUSING\b", clause, re.I)
        ):
            found.append(
                (
                    line,
                    "enum-without-using",
                    f"{table}.{_name(col_type.group(1))} changed to enum "
                    f"{_name(col_type.group(2))} without USING: PostgreSQL cannot cast it "
                    f"automatically (postgresql_using='{_name(col_type.group(1))}::"
                    f"{_name(col_type.group(2))}')",
                )
            )
        add = re.match(
            rf"ADD (?!CONSTRAINT\b)(?:COLUMN )?(?:IF NOT EXISTS )?({_IDENT}) (.*)",
            clause,
            re.I,
        )
        if (
            add
            and table in existing
            and re.search(r"\bNOT NULL\b", add.group(2), re.I)
            and not re.search(r"\b(DEFAULT|GENERATED)\b", add.group(2), re.I)
        ):
            found.append(
                (
                    line,
                    "not-null-without-default",
                    f"NOT NULL column {table}.{_name(add.group(1))} added to an existing "
                    "table without a default fails on any existing row",
                )
            )
    return found


def _online_findings(
    flat: str, line: int, existing: set[str], *, autocommit: bool
) -> list[tuple[int, str, str]]:
    """What breaks the online promise: a long lock on a table other sessions use."""
    found: list[tuple[int, str, str]] = []
    alter = re.match(rf"ALTER TABLE (?:IF EXISTS )?(?:ONLY )?({_IDENT}) (.*?);?$", flat, re.I)
    if alter and _name(alter.group(1)) in existing:
        table = _name(alter.group(1))
        for clause in _split_top_level(alter.group(2)):
            if re.match(rf"ALTER (?:COLUMN )?{_IDENT} (?:SET DATA )?TYPE\b", clause, re.I) or (
                re.match(r"ADD (?!CONSTRAINT\b)", clause, re.I)
                and re.search(_VOLATILE, clause, re.I)
            ):
                found.append(
                    (
                        line,
                        "table-rewrite",
                        f"{clause.split(' ')[0].upper()} on {table} rewrites the table under "
                        "ACCESS EXCLUSIVE: add a column of the new type, backfill it with "
                        "online.backfill and swap (docs/migrations.md)",
                    )
                )
            constraint = re.match(
                rf"ADD CONSTRAINT {_IDENT} (CHECK|FOREIGN KEY|UNIQUE|PRIMARY KEY)\b(.*)",
                clause,
                re.I,
            )
            if constraint and not re.search(r"\b(NOT VALID|USING INDEX)\b", clause, re.I):
                found.append(
                    (
                        line,
                        "validation-under-lock",
                        f"{constraint.group(1).upper()} on {table} is checked against every row "
                        "under the ALTER's lock: add it NOT VALID and VALIDATE it apart "
                        "(online.add_check / add_foreign_key)",
                    )
                )
            if re.match(rf"ALTER (?:COLUMN )?{_IDENT} SET NOT NULL\b", clause, re.I):
                found.append(
                    (
                        line,
                        "validation-under-lock",
                        f"SET NOT NULL on {table} scans every row under ACCESS EXCLUSIVE unless "
                        "a validated CHECK (col IS NOT NULL) proves it: add that check first",
                    )
                )
    update = re.match(rf"(?:WITH .*?\)\s*)?UPDATE (?:ONLY )?({_IDENT})\b", flat, re.I) or re.search(
        rf"\bAS \(\s*UPDATE (?:ONLY )?({_IDENT})\b", flat, re.I
    )
    if (
        update
        and not flat.upper().startswith("DO ")
        and _name(update.group(1)) in existing
        and not re.search(r"\bLIMIT\b", flat, re.I)
    ):
        found.append(
            (
                line,
                "backfill-in-one-statement",
                f"UPDATE of {_name(update.group(1))} in one statement locks every row it "
                "touches until the revision commits: batch it (online.backfill)",
            )
        )
    if autocommit and _STRONG.match(flat):
        found.append(
            (
                line,
                "missing-lock-timeout",
                "outside the revision's transaction SET LOCAL lock_timeout does not apply: "
                "run this through online.ddl(), which sets it and retries",
            )
        )
    return found


def _own_rules(
    compiled: CompiledRevision, downgrade: CompiledRevision, before: _Schema, script: Script
) -> list[tuple[int, str, str]]:
    found: list[tuple[int, str, str]] = []
    statements = _statements(compiled)
    created_here = _Schema()
    for chunk in statements:
        _apply_to_schema(created_here, chunk.sql)
    enums = before.enums | created_here.enums
    existing = before.tables

    for chunk in statements:
        flat = " ".join(chunk.sql.split())
        line = chunk.source_line or 1
        index = re.match(
            rf"CREATE (?:UNIQUE )?INDEX (?!CONCURRENTLY)(?:IF NOT EXISTS )?(?:{_IDENT} )?"
            rf"ON (?:ONLY )?({_IDENT})",
            flat,
            re.I,
        )
        if index and _name(index.group(1)) in existing:
            found.append(
                (
                    line,
                    "index-not-concurrent",
                    f"CREATE INDEX on existing table {_name(index.group(1))} without "
                    "CONCURRENTLY blocks its writes while the index builds "
                    "(use op.create_index(..., postgresql_concurrently=True) in an "
                    "autocommit_block)",
                )
            )
        found += _alter_findings(flat, line, existing, enums)
        found += _online_findings(flat, line, existing, autocommit=chunk.autocommit)

    dropped = _Schema(enums=set(created_here.enums))
    for chunk in _statements(downgrade):
        for m in re.finditer(rf"DROP TYPE (?:IF EXISTS )?({_IDENT})", chunk.sql, re.I):
            dropped.enums.discard(_name(m.group(1)))
    for chunk in statements:
        for m in re.finditer(rf"CREATE TYPE ({_IDENT}) AS ENUM", chunk.sql, re.I):
            if _name(m.group(1)) in dropped.enums:
                found.append(
                    (
                        chunk.source_line or 1,
                        "enum-not-dropped",
                        f"enum {_name(m.group(1))} created in upgrade is not dropped in "
                        "downgrade (a re-upgrade would fail on CREATE TYPE)",
                    )
                )

    for direction, rev in (("upgrade", compiled), ("downgrade", downgrade)):
        stmts = _statements(rev)
        if not stmts:
            continue
        first = " ".join(stmts[0].sql.split())
        if not re.match(r"SET (?:LOCAL )?lock_timeout\b", first, re.I):
            fn = getattr(script.module, direction, None)
            code = getattr(fn, "__code__", None)
            found.append(
                (
                    code.co_firstlineno if code is not None else 1,
                    "missing-lock-timeout",
                    f'{direction}() does not start with op.execute("SET LOCAL lock_timeout = '
                    "'5s'\"): a DDL queued behind a long transaction would block every writer",
                )
            )
    return found


def _rls(compiled: CompiledRevision) -> list[tuple[int, str, str]]:
    """rls.check_rls's findings on the revision's statements, at the source line that emitted each.

    The statements are joined with `;\n` into one text, so that an ENABLE ROW LEVEL SECURITY
    in a later statement than its CREATE TABLE counts; each finding's line in that text is
    mapped back to the statement it falls in.
    """
    starts: list[tuple[int, int]] = []  # (first line in the joined text, source line)
    parts: list[str] = []
    line = 1
    for chunk in _statements(compiled):
        statement = chunk.sql.rstrip(";").rstrip()
        starts.append((line, chunk.source_line or 1))
        parts.append(statement)
        line += statement.count("\n") + 1
    found = []
    for finding in check_rls(";\n".join(parts), filename=str(compiled.path)):
        source = next(src for first, src in reversed(starts) if first <= finding.line)
        found.append((source, finding.rule, finding.message))
    return found


def squawk_binary() -> str:
    """squawk-cli installs a binary next to the interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "squawk"
    if beside.is_file():
        return str(beside)
    found = shutil.which("squawk")
    if found is None:
        raise HeimdexError(f"heimdex db lint needs squawk (squawk-cli): {EXTRA_HINT}")
    return found


def _squawk(compiled: CompiledRevision, created_here: set[str]) -> list[tuple[int, str, str]]:
    """squawk's findings, except on tables this revision creates (squawk only exempts some)."""
    statements = _statements(compiled)
    if not statements:
        return []
    with tempfile.TemporaryDirectory(prefix="heimdex-lint-") as tmp:
        sql_file = Path(tmp) / f"{compiled.revision}.sql"
        sql_file.write_text(compiled.text, encoding="utf-8")
        proc = subprocess.run(
            [
                squawk_binary(),
                "--reporter",
                "json",
                "--exclude",
                ",".join(sorted(SQUAWK_EXCLUDED)),
                str(sql_file),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    try:
        if not proc.stdout.strip() and proc.returncode != 0:
            raise json.JSONDecodeError("no output", "", 0)
        reported = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        raise HeimdexError(
            f"squawk failed on {compiled.revision}: {(proc.stderr or proc.stdout).strip()}"
        ) from None
    found = []
    for item in reported:
        line = int(item["line"]) + 1  # squawk counts from 0
        owner = next((c for c in reversed(compiled.chunks) if c.first_line <= line), None)
        if owner is None or owner.source_line is None:
            continue  # Alembic's own bookkeeping (alembic_version)
        if _target_table(owner.sql) in created_here:
            continue  # nobody else can see a table this revision creates: no lock to fear
        found.append((owner.source_line, item["rule_name"], item["message"]))
    return found


def _target_table(sql: str) -> str | None:
    flat = " ".join(sql.split())
    m = re.match(rf"ALTER TABLE (?:IF EXISTS )?(?:ONLY )?({_IDENT})", flat, re.I) or re.match(
        rf"CREATE (?:UNIQUE )?INDEX (?:CONCURRENTLY )?(?:IF NOT EXISTS )?(?:{_IDENT} )?"
        rf"ON (?:ONLY )?({_IDENT})",
        flat,
        re.I,
    )
    return _name(m.group(1)) if m else None


def _acknowledge(path: Path, raw: list[tuple[int, str, str]]) -> tuple[list[Finding], int]:
    lines = path.read_text(encoding="utf-8").splitlines()
    markers: dict[int, tuple[set[str], str]] = {}
    for number, text in enumerate(lines, start=1):
        m = MARKER.search(text)
        if m:
            rules = {r.strip() for r in m.group(1).split(",") if r.strip()}
            markers[number] = (rules, m.group(2).strip())
    used: set[tuple[int, str]] = set()
    findings: list[Finding] = []
    acknowledged = 0
    for line, rule, message in sorted(set(raw)):
        candidates = [line]
        above = line - 1
        while above >= 1 and lines[above - 1].strip().startswith("#"):
            candidates.append(above)
            above -= 1
        marker_line = next((c for c in candidates if c in markers and rule in markers[c][0]), None)
        if marker_line is None:
            findings.append(Finding(path, line, rule, message))
            continue
        used.add((marker_line, rule))
        if markers[marker_line][1]:
            acknowledged += 1
        else:
            findings.append(
                Finding(
                    path,
                    marker_line,
                    "lint-marker-without-reason",
                    f"ignore[{rule}] needs a reason after the bracket",
                )
            )
    for number, (rules, _reason) in markers.items():
        for rule in sorted(rules):
            if (number, rule) not in used:
                findings.append(
                    Finding(path, number, "unused-lint-marker", f"nothing here triggers {rule}")
                )
    return findings, acknowledged


def lint(ctx: DbContext, revisions: tuple[str, ...] | list[str] | None = None) -> LintReport:
    """Lint the given revisions (ids, prefixes or head; default: all) in history order."""
    cfg = ctx.config
    scripts = ctx.scripts()
    history = ordered_revisions(scripts)
    wanted = set()
    for given in revisions or []:
        script = resolve_revision(scripts, given)
        if script is None:
            raise HeimdexError(f"{given!r} names no revision to lint (base is before the first)")
        wanted.add(script.revision)
    report = LintReport()
    before = _Schema()
    # Revisions up to the baseline predate the RLS rule (the baseline covers their tables).
    after_baseline = False
    for number, script in enumerate(history, 1):
        compiled = compile_revision(cfg, script)
        if not wanted or script.revision in wanted:
            logger.info(
                "[%d/%d] %s",
                number,
                len(history),
                script.revision,
                extra={"action": "db.lint.revision", "revision": script.revision},
            )
            downgrade = compile_revision(cfg, script, direction="downgrade")
            created = _Schema()
            for chunk in _statements(compiled):
                _apply_to_schema(created, chunk.sql)
            raw = _squawk(compiled, created.tables - before.tables)
            raw += _own_rules(compiled, downgrade, before, script)
            if after_baseline:
                raw += _rls(compiled)
            findings, acknowledged = _acknowledge(Path(script.path), raw)
            report.findings += findings
            report.acknowledged += acknowledged
            report.revisions += 1
        for chunk in _statements(compiled):
            _apply_to_schema(before, chunk.sql)
        after_baseline = after_baseline or script.revision == RLS_BASELINE_REVISION
    return report
