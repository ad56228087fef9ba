"""The Supabase artifacts: `supabase/migrations/NNNN_<slug>.sql`, compiled from the history.

Each file is byte for byte what `python -m alembic upgrade <prev>:<rev> --sql` prints for its
revision (`upgrade <rev> --sql` for the first), so the playbook's command and this compiler agree.
A revision with an `autocommit_block()` (e.g. CREATE INDEX CONCURRENTLY) is cut where Alembic
commits: each statement of the block gets a file of its own, since the Supabase CLI runs every
file in one transaction. Concatenating a revision's files gives the playbook's output again.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from alembic.config import Config
from alembic.script import Script

from heimdex.errors import HeimdexError
from heimdex_db.backfills import guard_sql
from heimdex_db.config import ARTIFACT_DIR
from heimdex_db.context import DbContext
from heimdex_db.history import ordered_revisions, scripts_of
from heimdex_db.supabase.offline import Chunk, compile_revision

logger = logging.getLogger(__name__)

# The names the playbook gave the first two artifacts; later revisions may declare
# `supabase_slug = "..."` in their module, otherwise the slug comes from the message.
PLAYBOOK_SLUGS = {
    "001_job_ledger_init": "job_ledger_init",
    "3af4686817cc": "job_ledger_hardening",
}
ARTIFACT_NAME = re.compile(r"^\d{4}_.+\.sql$")
SLUG_MAX = 60


class ArtifactsStale(HeimdexError):
    """`sql --check`: artifacts missing, different from the history, or unexpected."""


class ArtifactsUnbatchable(HeimdexError):
    """A compiled artifact the Supabase CLI cannot apply (see `supabase.batches`)."""


@dataclass(frozen=True)
class Artifact:
    name: str
    revision: str
    content: str


def slug_for(script: Script) -> str:
    if script.revision in PLAYBOOK_SLUGS:
        return PLAYBOOK_SLUGS[script.revision]
    declared = getattr(script.module, "supabase_slug", None)
    if isinstance(declared, str) and declared:
        return declared
    slug = re.sub(r"[^a-z0-9]+", "_", (script.doc or script.revision).lower()).strip("_")
    return slug[:SLUG_MAX].rstrip("_") or script.revision


def split_transactions(chunks: list[Chunk]) -> list[str]:
    """The revision's text cut into parts that each run as one transaction."""
    parts: list[list[Chunk]] = []
    current: list[Chunk] = []
    for chunk in chunks:
        if not chunk.autocommit:
            current.append(chunk)
        elif chunk.sql == "COMMIT;":
            current.append(chunk)
            parts.append(current)
            current = []
        elif chunk.sql == "BEGIN;":
            current = [chunk]
        elif chunk.sql.startswith("--") or not chunk.sql:
            current.append(chunk)
        else:
            parts.append([*current, chunk])
            current = []
    if current:
        parts.append(current)
    return ["".join(c.text for c in part) for part in parts if any(c.sql for c in part)]


def compile_artifacts(cfg: Config) -> list[Artifact]:
    """Every artifact of the history, in order, numbered from 0001 (or a baseline's number)."""
    artifacts: list[Artifact] = []
    history = ordered_revisions(scripts_of(cfg))
    # A baseline (`heimdex db squash`) takes the number of the last file it replaces, so that
    # the files after it keep theirs: a project that applied them sees the same versions.
    first = int(getattr(history[0].module, "supabase_number", 1)) if history else 1
    for script in history:
        compiled = compile_revision(cfg, script)
        if (guard := guard_sql(script)) is not None:
            # In the transaction of the revision's first statements: they run only once it passed.
            at = next((i + 1 for i, c in enumerate(compiled.chunks) if c.sql == "BEGIN;"), 0)
            compiled.chunks.insert(at, Chunk(guard, 0, None, autocommit=False))
        parts = split_transactions(compiled.chunks)
        slug = slug_for(script)
        for i, content in enumerate(parts):
            suffix = "" if i == 0 else f"_{i + 1}"
            name = f"{first + len(artifacts):04d}_{slug}{suffix}.sql"
            artifacts.append(Artifact(name, script.revision, content))
    return artifacts


@dataclass(frozen=True)
class SqlResult:
    directory: Path
    written: list[str]
    unchanged: list[str]
    unexpected: list[str]


def _existing(directory: Path) -> dict[str, bytes]:
    if not directory.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in directory.iterdir() if ARTIFACT_NAME.match(p.name)}


def unbatchable(artifacts: list[Artifact], directory: Path | None = None) -> list[str]:
    """Files the Supabase CLI cannot apply, one line each naming it: a statement that must run
    outside a transaction shares its file with others. The files in `directory` are judged as
    they are, then every compiled artifact that differs from its file."""
    # Imported here: the parser is in the tooling extra, which `heimdex db upgrade` needs not.
    from heimdex_db.supabase.batches import mixed_batch  # noqa: PLC0415

    on_disk = _existing(directory) if directory is not None else {}
    problems = []
    for name, data in sorted(on_disk.items()):
        if (reason := mixed_batch(data.decode(errors="replace"))) is not None:
            problems.append(f"{directory / name if directory else name}: {reason}")
    for artifact in artifacts:
        if on_disk.get(artifact.name) == artifact.content.encode():
            continue
        if (reason := mixed_batch(artifact.content)) is not None:
            problems.append(
                f"{artifact.name} (compiled from revision {artifact.revision}): {reason}"
            )
    return problems


def check_artifacts(artifacts: list[Artifact], directory: Path) -> list[str]:
    """One problem per line naming the file; empty when the directory is current."""
    existing = _existing(directory)
    problems = unbatchable(artifacts, directory)
    for artifact in artifacts:
        path = directory / artifact.name
        if artifact.name not in existing:
            problems.append(f"{path}: missing (compiled from revision {artifact.revision})")
        elif existing[artifact.name] != artifact.content.encode():
            problems.append(f"{path}: stale (differs from revision {artifact.revision})")
    expected = {a.name for a in artifacts}
    problems += [
        f"{directory / name}: unexpected (no revision of the history compiles to it)"
        for name in sorted(set(existing) - expected)
    ]
    return problems


def sql(ctx: DbContext, *, output_dir: Path | str | None = None, check: bool = False) -> SqlResult:
    """Compile the artifacts into `output_dir` (default: the repository's supabase/migrations).

    Needs no database. With `check`, writes nothing and raises `ArtifactsStale` naming every
    missing, stale or unexpected file, and every file the Supabase CLI cannot apply (a statement
    that must run outside a transaction beside others). Without it, a compiled artifact the CLI
    cannot apply raises `ArtifactsUnbatchable` before anything is written.
    """
    directory = Path(output_dir) if output_dir is not None else ARTIFACT_DIR
    artifacts = compile_artifacts(ctx.config)
    if not check and (problems := unbatchable(artifacts)):
        raise ArtifactsUnbatchable(
            "nothing written; the Supabase CLI could not apply:\n"
            + "\n".join(f"  {problem}" for problem in problems)
        )
    if check:
        problems = check_artifacts(artifacts, directory)
        if problems:
            raise ArtifactsStale(
                f"{len(problems)} problem(s) with the Supabase artifacts (run `heimdex db sql`):\n"
                + "\n".join(f"  {problem}" for problem in problems)
            )
        return SqlResult(directory, [], [a.name for a in artifacts], [])
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HeimdexError(
            f"cannot create {directory}: {exc.strerror}; choose a writable --output-dir"
        ) from None
    existing = _existing(directory)
    written, unchanged = [], []
    for artifact in artifacts:
        data = artifact.content.encode()
        if existing.get(artifact.name) == data:
            unchanged.append(artifact.name)
            continue
        try:
            (directory / artifact.name).write_bytes(data)
        except OSError as exc:
            raise HeimdexError(
                f"cannot write {directory / artifact.name}: {exc.strerror}; "
                "choose a writable --output-dir"
            ) from None
        logger.info("wrote %s (revision %s)", artifact.name, artifact.revision)
        written.append(artifact.name)
    unexpected = sorted(set(existing) - {a.name for a in artifacts})
    for name in unexpected:
        logger.warning("%s is not compiled from any revision: remove it if it is obsolete", name)
    return SqlResult(directory, written, unchanged, unexpected)
