"""`heimdex dev`, the README's bring-it-up command, run for real as a subprocess."""

from __future__ import annotations

import json
import os
import pty
import re
import select
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

from heimdex_db.localpg import free_port

pytestmark = pytest.mark.slow  # heimdex dev and its processes

CLI = ("-m", "heimdex")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Not tmp_path: the unprivileged PostgreSQL user must be able to traverse it.
    path = Path(tempfile.mkdtemp(prefix="heimdex-dev-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _env() -> dict[str, str]:
    drop = ("DATABASE_URL", "HEIMDEX_ENV", "NO_COLOR", "HEIMDEX_LOG_FORMAT", "HEIMDEX_LOG_LEVEL")
    return {k: v for k, v in os.environ.items() if not k.startswith("PG") and k not in drop}


def _json_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    """Without a terminal (a log collector's view): the ready block on stdout, and with
    --follow every process's log on stderr as JSON lines; no colour codes anywhere."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            *CLI,
            "dev",
            "--follow",
            "--port",
            str(port),
            "--state-dir",
            str(state_dir),
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        dev_env = state_dir / "dev.env"
        for _ in range(600):
            if dev_env.is_file() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert dev_env.is_file(), proc.communicate(timeout=10) if proc.poll() is not None else ""
        # As a person uses it: `. .heimdex/dev.env`, then a command that reads the environment.
        sourced = subprocess.run(
            ["bash", "-c", '. "$1" && env -0', "bash", str(dev_env)],
            env={"PATH": "/usr/bin:/bin"},
            capture_output=True,
            check=True,
        )
        values = dict(item.split("=", 1) for item in sourced.stdout.decode().split("\0") if item)
        url, token = values["HEIMDEX_URL"], values["HEIMDEX_TOKEN"]
        assert values["DATABASE_URL"].startswith("postgresql+psycopg://")
        # The README's next step in that shell: the operator's console finds the database.
        stats = subprocess.run(
            ["bash", "-c", '. "$1" && exec "$2" -m heimdex jobs stats', "bash", str(dev_env),
             sys.executable],
            env=_env(), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert stats.returncode == 0, stats.stderr
        assert stats.stdout.startswith("STATUS"), stats.stdout
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
        output, logs = proc.communicate(timeout=STOP_SECONDS)
    assert proc.returncode == 0, output + logs
    assert f"Heimdex is up at http://127.0.0.1:{port}" in output
    assert f"export HEIMDEX_TOKEN={token}" in output
    assert f"http://127.0.0.1:{port}/docs" in output
    assert "make demo" in output
    assert not ANSI.search(output + logs)
    assert "Warning" not in output + logs  # PyJWT's InsecureKeyLengthWarning among others
    records = [json.loads(line) for line in logs.splitlines()]
    by_process = {str(r["process"]) for r in records}
    assert {"dev", "api", "worker"} <= by_process, by_process
    assert any(r.get("action") == "worker.started" for r in records)
    # Third-party chatter is below the default level, in the stream and in the files.
    assert not [r for r in records if r["logger"] == "uvicorn.access"]
    assert not [r for r in records if str(r["msg"]).startswith("Context impl")]
    assert _json_lines(state_dir / "logs" / "api.log")
    assert _json_lines(state_dir / "logs" / "worker.log")
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


# The stack's own bound on stopping: one shutdown grace for the API and the worker together
# (plus its margin), then PostgreSQL's fast shutdown; with room for a loaded machine.
STOP_SECONDS = 150


def _wait_stopped(proc: subprocess.Popen[bytes], state_dir: Path) -> None:
    try:
        proc.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        tails = {
            log.name: log.read_text().splitlines()[-5:]
            for log in sorted((state_dir / "logs").glob("*.log"))
        }
        pytest.fail(f"heimdex dev did not stop within {STOP_SECONDS}s; its logs end: {tails}")


def _read_until(fd: int, marker: bytes, deadline: float) -> bytes:
    seen = b""
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_dev_on_a_terminal_shows_a_person_the_ready_block_in_colour_and_no_log_lines(
    state_dir: Path,
) -> None:
    port = free_port()
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, *CLI, "dev", "--port", str(port), "--state-dir", str(state_dir)],
        env=_env(),
        stdin=child,
        stdout=child,
        stderr=child,
        start_new_session=True,
    )
    os.close(child)
    try:
        screen = _read_until(main, b"Ctrl-C stops everything.", time.monotonic() + 90)
        proc.send_signal(signal.SIGINT)
        _wait_stopped(proc, state_dir)
        screen += _read_until(main, b"\0", time.monotonic() + 2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    text = screen.decode()
    plain = ANSI.sub("", text)
    assert proc.returncode == 0, plain
    assert ANSI.search(text), text
    assert f"Heimdex is up at http://127.0.0.1:{port}" in plain
    assert re.search(rf"API docs +http://127\.0\.0\.1:{port}/docs", plain), plain
    assert re.search(rf"Dashboard +http://127\.0\.0\.1:{port}/ui\s", plain), plain
    assert "--role heimdex_admin" in plain
    assert "export HEIMDEX_TOKEN=ey" in plain
    assert "make demo" in plain
    assert "logs/{dev,api,worker}.log" in plain
    # No log records (JSON or rendered) and no warnings reach the person's screen.
    lines = [line.strip() for line in plain.splitlines()]
    assert not [line for line in lines if line.startswith("{")], plain
    assert not [line for line in lines if re.match(r"\d\d:\d\d:\d\d\.\d{3} ", line)], plain
    assert "Warning" not in plain
    # The logs went to the files instead, as JSON lines for the processes it started.
    api = _json_lines(state_dir / "logs" / "api.log")
    assert any(r["msg"] == "Application startup complete." for r in api)
    assert {r["process"] for r in api} == {"api"}
    assert any(
        r.get("action") == "localpg.start" for r in _json_lines(state_dir / "logs" / "dev.log")
    )


def test_dev_logs_renders_the_files_for_a_person_or_passes_json_through(state_dir: Path) -> None:
    logs = state_dir / "logs"
    logs.mkdir()
    record = {
        "ts": "2026-01-02T03:04:05.678+00:00",
        "level": "warning",
        "process": "worker",
        "logger": "heimdex_worker.runtime",
        "msg": "lease lost",
        "job_id": "j1",
    }
    (logs / "worker.log").write_text(json.dumps(record) + "\nTraceback (most recent call last):\n")
    args = [sys.executable, *CLI, "dev", "--state-dir", str(state_dir), "logs"]
    console = subprocess.run(
        args,
        env={**_env(), "HEIMDEX_LOG_FORMAT": "console"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    first, second = console.stdout.splitlines()
    assert re.fullmatch(r"\d\d:04:05\.678 WARNING worker +lease lost  job_id=j1", first), first
    assert second == "worker  | Traceback (most recent call last):"
    as_json = subprocess.run(
        args, env=_env(), capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(as_json.stdout.splitlines()[0]) == record
    missing = subprocess.run(
        [*args, "api"], env=_env(), capture_output=True, text=True, timeout=60, check=False
    )
    assert missing.returncode == 1
    assert "no log named api; there are: worker" in missing.stderr
