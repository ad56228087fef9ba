"""Expand/contract phases: when, around a deploy, a revision may run.

A revision declares `phase = "expand"` (only adds: safe before the new code is deployed, while
the old code still runs), `"data"` (moves rows) or `"contract"` (drops, renames, tightens: only
once no old code is left). `heimdex db upgrade --phase expand` applies pending revisions while
they are expand revisions; `heimdex db lint` refuses a contract operation in an expand one.
"""

from __future__ import annotations

from alembic.script import Script

PHASES = ("expand", "data", "contract")


def phase_of(script: Script) -> str | None:
    """The phase `script` declares, or None (a revision of no phase)."""
    phase = getattr(script.module, "phase", None)
    return phase if isinstance(phase, str) else None
