"""A lint finding, what every `heimdex db lint` rule reports, and the rules' names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    "contract-in-expand",
    "phase-unknown",
)
RLS_RULE = "table-without-rls"
# Revisions up to this one predate the RLS rule (this one brings RLS to the tables they created).
RLS_BASELINE_REVISION = "7e5b3c8d1f20"


@dataclass(frozen=True, order=True)
class Finding:
    path: Path
    line: int
    rule: str
    message: str

    def render(self) -> str:
        return f"{self.path}:{self.line} {self.rule} {self.message}"
