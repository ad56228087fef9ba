"""`.heimdex/dev.env`, as the README and `make demo` use it: `. .heimdex/dev.env` in a shell
exports what the next command (`heimdex jobs`, curl) needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from heimdex_dev.devstack import write_env_file

VALUES = {
    "HEIMDEX_URL": "http://127.0.0.1:8000",
    "HEIMDEX_TOKEN": "eyJhbGciOi.J9-_x",
    "DATABASE_URL": "postgresql+psycopg://postgres:p%40ss'w$rd `x` ;&@127.0.0.1:5433/heimdex",
}


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_sourcing_the_env_file_exports_every_value_verbatim(tmp_path: Path, shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell} on this machine")
    path = tmp_path / "dev.env"
    write_env_file(path, VALUES)
    # `env` is a child process: it sees only what was exported.
    proc = subprocess.run(
        [shell, "-c", '. "$1" && env -0', shell, str(path)],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=True,
    )
    seen = dict(item.split("=", 1) for item in proc.stdout.decode().split("\0") if item)
    assert {k: seen.get(k) for k in VALUES} == VALUES
    assert proc.stderr == b""
    assert path.stat().st_mode & 0o077 == 0  # a token and a database URL: the owner's alone
