"""Fixtures for the service tests: fast settings, the API, worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import URL

from heimdex.settings import Settings
from heimdex_api.app import create_app
from heimdex_api.auth import issue_token
from heimdex_worker.main import run_worker

SECRET = "test-secret-for-heimdex-tests-0123456789"
FAST = {
    "HEIMDEX_JWT_SECRET": SECRET,
    "HEIMDEX_LEASE_SECONDS": "1.0",
    "HEIMDEX_HEARTBEAT_SECONDS": "0.2",
    "HEIMDEX_REAPER_INTERVAL_SECONDS": "0.2",
    "HEIMDEX_BACKOFF_BASE_SECONDS": "0.05",
    "HEIMDEX_POLL_INTERVAL_SECONDS": "0.2",
    "HEIMDEX_WORKER_CONCURRENCY": "2",
    "HEIMDEX_SHUTDOWN_GRACE_SECONDS": "10",
}


def wait_for(
    predicate: Callable[[], Any], *, what: str, timeout: float = 30.0, interval: float = 0.05
) -> Any:
    """Poll until `predicate()` is truthy; the timeout only guards against a hung test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture
def stack_env(db_url: URL) -> dict[str, str]:
    return {
        **FAST,
        "DATABASE_URL": db_url.render_as_string(hide_password=False),
        "HEIMDEX_ENV": "local",
    }


@pytest.fixture
def settings(stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in stack_env.items():
        monkeypatch.setenv(key, value)
    return Settings()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def auth(org_id: uuid.UUID, sub: str = "tester") -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, org_id=org_id, sub=sub)}"}


@dataclass
class Processes:
    """`heimdex` subcommands as real processes; their logs go to files (a pipe nobody reads
    would fill up and block a process that logs a lot, e.g. through a database restart)."""

    env: dict[str, str]
    log_dir: Path
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{len(self.running)}-{args[0]}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "heimdex", *args],
            env={**os.environ, **self.env, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        log.close()
        self.running.append(proc)
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        index = self.running.index(proc)
        return next(self.log_dir.glob(f"{index}-*.log")).read_text()

    def stop_all(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def processes(stack_env: dict[str, str], tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(stack_env, tmp_path)
    yield procs
    procs.stop_all()


@pytest.fixture(scope="module")
def module_processes(
    create_database: Callable[..., URL],
    head_template: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Processes]:
    """Like `processes`, on a database of the module's own: a server the module's tests share
    (started once per xdist worker that runs the module's tests)."""
    url = create_database(template=head_template)
    env = {
        **FAST,
        "DATABASE_URL": url.render_as_string(hide_password=False),
        "HEIMDEX_ENV": "local",
    }
    procs = Processes(env, tmp_path_factory.mktemp("processes"))
    yield procs
    procs.stop_all()


@dataclass
class ThreadWorkers:
    """`heimdex worker`'s own entry function (`run_worker`: engine, registry, runtime) on
    threads of this process, without the cost of starting one; each stops as SIGTERM stops
    the process. For what needs no process of its own (a signal, a kill)."""

    settings: Settings
    running: list[tuple[threading.Event, threading.Thread]] = field(default_factory=list)

    def start(self, settings: Settings | None = None) -> threading.Event:
        """Start a worker (on `settings`, default the test's); the event returned stops it."""
        stop = threading.Event()
        args = (settings or self.settings, stop)
        thread = threading.Thread(target=run_worker, args=args, name="worker")
        thread.start()
        self.running.append((stop, thread))
        return stop

    def stop_all(self) -> None:
        for stop, _ in self.running:
            stop.set()
        for _, thread in self.running:
            thread.join()


@pytest.fixture
def thread_workers(settings: Settings) -> Iterator[ThreadWorkers]:
    workers = ThreadWorkers(settings)
    yield workers
    workers.stop_all()
