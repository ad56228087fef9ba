"""`heimdex dev`, the README's bring-it-up command, run for real as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from heimdex_common.localpg import free_port

CLI = ("-c", "from heimdex_common.cli import main; main()")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Not tmp_path: the unprivileged PostgreSQL user must be able to traverse it.
    path = Path(tempfile.mkdtemp(prefix="heimdex-dev-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env() -> dict[str, str]:
    drop = ("DATABASE_URL", "HEIMDEX_ENV")
    return {k: v for k, v in os.environ.items() if not k.startswith("PG") and k not in drop}


def _request(url: str, token: str, body: dict[str, object] | None = None) -> dict[str, object]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(  # noqa: S310 - loopback URL built by the test
        url,
        data=data,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
        result: dict[str, object] = json.load(resp)
        return result


def test_dev_brings_up_the_stack_runs_a_job_and_stops_on_ctrl_c(state_dir: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, *CLI, "dev", "--port", str(port), "--state-dir", str(state_dir)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        dev_env = state_dir / "dev.env"
        for _ in range(600):
            if dev_env.is_file() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert dev_env.is_file(), proc.communicate(timeout=10)[0] if proc.poll() is not None else ""
        values = dict(line.split("=", 1) for line in dev_env.read_text().splitlines())
        url, token = values["HEIMDEX_URL"], values["HEIMDEX_TOKEN"]
        assert url == f"http://127.0.0.1:{port}"

        job = _request(f"{url}/jobs", token, {"type": "noop", "params": {}})
        status = job["status"]
        for _ in range(300):
            status = _request(f"{url}/jobs/{job['id']}", token)["status"]
            if status == "succeeded":
                break
            time.sleep(0.1)
        assert status == "succeeded"
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    assert f"Heimdex is up at http://127.0.0.1:{port}" in output
    # Everything it started is gone: the API port and the cluster's pid file.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    assert not (state_dir / "pg" / "data" / "postmaster.pid").exists()


def test_dev_refuses_a_busy_port_before_starting_anything(state_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, *CLI, "dev", "--port", str(port), "--state-dir", str(state_dir)],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 1
    assert f"port {port} is already in use" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (state_dir / "pg").exists()
