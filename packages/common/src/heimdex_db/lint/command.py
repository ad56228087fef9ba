"""`heimdex db lint`: SQL that locks or breaks a live database, found before it ships.

Each revision's upgrade SQL is compiled offline (no database), parsed by PostgreSQL's own
parser (`sql.py`), and checked:

- by squawk (`squawk.py`), on that revision's SQL alone;
- by our own rules (`rules.py`), which know the schema before the revision from the SQL of the
  revisions before it (tables and enum types created, dropped and renamed);
- by `table-without-rls` (`rls.py`), on the revisions after the one that brought RLS to the
  ledger: a table created in `public` gets row-level security in the same revision.

A finding is reported at the line of the revision's source that emitted the statement, so a
comment on or just above that line acknowledges it:

    # heimdex-lint: ignore[index-not-concurrent] job is rewritten in this transaction anyway
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from heimdex.errors import HeimdexError
from heimdex_db.context import DbContext
from heimdex_db.history import ordered_revisions, resolve_revision
from heimdex_db.lint.expand import expand_findings
from heimdex_db.lint.findings import RLS_BASELINE_REVISION, Finding
from heimdex_db.lint.rls import rls_findings
from heimdex_db.lint.rules import Schema, own_rules
from heimdex_db.lint.sql import revision_statements
from heimdex_db.lint.squawk import squawk_findings
from heimdex_db.supabase.offline import compile_revision

logger = logging.getLogger(__name__)

MARKER = re.compile(r"#\s*heimdex-lint:\s*ignore\[([^\]]*)\](.*)$")


@dataclass
class LintReport:
    findings: list[Finding] = field(default_factory=list)
    acknowledged: int = 0
    revisions: int = 0


def _acknowledge(path: Path, raw: list[Finding]) -> tuple[list[Finding], int]:
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
    for finding in sorted(set(raw)):
        line, rule = finding.line, finding.rule
        candidates = [line]
        above = line - 1
        while above >= 1 and lines[above - 1].strip().startswith("#"):
            candidates.append(above)
            above -= 1
        marker_line = next((c for c in candidates if c in markers and rule in markers[c][0]), None)
        if marker_line is None:
            findings.append(finding)
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
    before = Schema()
    # Revisions up to the baseline predate the RLS rule (the baseline covers their tables).
    after_baseline = False
    for number, script in enumerate(history, 1):
        compiled = compile_revision(cfg, script)
        upgrade = revision_statements(compiled)
        # A baseline (`heimdex db squash`) is pg_dump's output for a fresh database: the rules
        # judge the revisions it replaced, not it.
        squashes = tuple(getattr(script.module, "squashes", ()))
        if (not wanted or script.revision in wanted) and not squashes:
            logger.info(
                "[%d/%d] %s",
                number,
                len(history),
                script.revision,
                extra={"action": "db.lint.revision", "revision": script.revision},
            )
            downgrade = revision_statements(compile_revision(cfg, script, direction="downgrade"))
            created = Schema()
            created.apply(upgrade)
            raw = squawk_findings(compiled, created.tables - before.tables)
            raw += own_rules(script, upgrade, downgrade, before)
            raw += expand_findings(script, upgrade, before)
            if after_baseline:
                raw += rls_findings(upgrade, Path(script.path))
            findings, acknowledged = _acknowledge(Path(script.path), raw)
            report.findings += findings
            report.acknowledged += acknowledged
            report.revisions += 1
        before.apply(upgrade)
        after_baseline = (
            after_baseline
            or script.revision == RLS_BASELINE_REVISION
            or RLS_BASELINE_REVISION in squashes
        )
    return report
