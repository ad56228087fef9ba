"""Offline (`--sql`) compilation of one revision, statement by statement.

The text is exactly what `python -m alembic upgrade <prev>:<rev> --sql` prints; each chunk also
remembers the line of the revision's source that emitted it, so that `lint` can point at Python
and `sql` can put statements that must run outside a transaction in files of their own.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import Script
from alembic.util import CommandError

from heimdex.errors import HeimdexError


@dataclass(frozen=True)
class Chunk:
    """One write of Alembic's offline output: a statement (with `;\\n\\n`), a comment, BEGIN/COMMIT.

    `source_line` is the line of the revision file that emitted it (None for Alembic's own
    bookkeeping); `autocommit` is true for writes inside `autocommit_block()` and for the COMMIT
    and BEGIN that bracket such a block.
    """

    text: str
    first_line: int
    source_line: int | None
    autocommit: bool

    @property
    def is_transaction_control(self) -> bool:
        return self.text.strip() in ("BEGIN;", "COMMIT;")

    @property
    def sql(self) -> str:
        return self.text.strip()


@dataclass
class CompiledRevision:
    revision: str
    down_revision: str | None
    path: Path
    direction: str
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)


class _CapturingBuffer(io.StringIO):
    def __init__(self, source: Path) -> None:
        super().__init__()
        self._source = str(source)
        self._line = 1
        self._in_block = False
        self.chunks: list[Chunk] = []

    def write(self, s: str) -> int:
        source_line: int | None = None
        from_block_edge = False
        frame = sys._getframe(1)
        while frame is not None:
            if source_line is None and frame.f_code.co_filename == self._source:
                source_line = frame.f_lineno
            if frame.f_code.co_name == "autocommit_block":
                from_block_edge = True
            frame = frame.f_back  # type: ignore[assignment]
        # autocommit_block() itself writes only the COMMIT that opens the block and the BEGIN
        # that closes it; the statements in between come from the revision's own frame.
        if from_block_edge:
            self._in_block = s.strip() == "COMMIT;"
        autocommit = from_block_edge or self._in_block
        self.chunks.append(Chunk(s, self._line, source_line, autocommit))
        self._line += s.count("\n")
        return super().write(s)


def compile_revision(
    cfg: Config, script: Script, *, direction: str = "upgrade"
) -> CompiledRevision:
    """The offline SQL of `script` alone: `upgrade prev:rev --sql` or `downgrade rev:prev --sql`.

    For the first revision, `upgrade rev --sql` (which also creates alembic_version) and
    `downgrade rev:base --sql`.
    """
    if isinstance(script.down_revision, tuple | list):
        raise HeimdexError(
            f"revision {script.revision} is a merge point; compile its parents separately"
        )
    prev = script.down_revision
    buffer = _CapturingBuffer(Path(script.path))
    saved = cfg.output_buffer
    cfg.output_buffer = buffer
    try:
        if direction == "upgrade":
            target = f"{prev}:{script.revision}" if prev else script.revision
            command.upgrade(cfg, target, sql=True)
        else:
            command.downgrade(cfg, f"{script.revision}:{prev or 'base'}", sql=True)
    except CommandError as exc:
        raise HeimdexError(f"cannot compile {direction} of {script.revision}: {exc}") from None
    finally:
        cfg.output_buffer = saved
    return CompiledRevision(
        script.revision, prev, Path(script.path), direction, list(buffer.chunks)
    )
