"""A command line's entry function run in the test process, as its console script would run it.

Starting an interpreter and importing SQLAlchemy, Alembic and pydantic costs a second or more of
CPU per command on a loaded machine; most tests of a command prove nothing the process adds. This
runs the entry function with the process's view swapped for the call: the whole environment
(variables absent from `env` are unset), the working directory, stdin/stdout/stderr (click's
`CliRunner` isolation), and the exit code from `SystemExit`. What a command's logging setup
installs on the root logger goes when it returns. Where the process itself is the point (the
console script's imports, a signal, an exit code seen by a shell) tests start one.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from alembic.config import main as alembic_main
from click.testing import CliRunner

from heimdex.cli import main


def run_in_process(
    entry: Callable[[], object], argv: Sequence[str], *, cwd: Path, env: Mapping[str, str]
) -> subprocess.CompletedProcess[bytes]:
    """`entry()` (which reads `argv` itself) with `env` as the whole environment, in `cwd`."""
    overrides: dict[str, str | None] = {k: None for k in os.environ if k not in env}
    overrides.update(env)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    here = Path.cwd()
    code = 0
    os.chdir(cwd)
    try:
        with CliRunner().isolation(env=overrides) as (out, err, _):
            try:
                entry()
            except SystemExit as exc:  # as the interpreter turns it into an exit status
                if isinstance(exc.code, str):
                    sys.stderr.write(f"{exc.code}\n")
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except Exception:  # what the interpreter prints when the process dies of it
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            stdout, stderr = out.getvalue(), err.getvalue()
    finally:
        os.chdir(here)
        # A command's log handler wrote to the swapped (now closed) stderr; the ones it
        # replaced (a worker's, a test's) come back.
        for handler in [h for h in root.handlers if h not in handlers]:
            handler.close()
            root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess(list(argv), code, stdout, stderr)


def alembic(*args: str, cwd: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[bytes]:
    """`python -m alembic ARGS` run in this process (its `__main__` calls this same function)."""
    argv = list(args)
    return run_in_process(
        lambda: alembic_main(argv=argv, prog="alembic"), ["alembic", *argv], cwd=cwd, env=env
    )


def heimdex(*args: str, cwd: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """`heimdex ARGS` run in this process: the console script's entry function, options,
    settings and exit code, its output as text."""
    argv = list(args)
    proc = run_in_process(
        lambda: main.main(argv, prog_name="heimdex"), ["heimdex", *argv], cwd=cwd, env=env
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )
