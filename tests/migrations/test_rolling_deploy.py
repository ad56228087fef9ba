"""A rolling deploy: the previous release's workers keep running beside the new API while
`heimdex db upgrade --phase expand` runs online under steady submissions. Nothing may fail,
and every accepted job is done exactly once.

In a deploy's order: the previous release serves; the repository's expand revisions are applied
under load; the new API joins the previous one; a test expand revision that works on the busy
`job` table online (a column, a concurrent index) runs beside both; the previous API is drained
and stopped. The previous release's workers run every job throughout.

The previous release is an installed checkout named by HEIMDEX_PREVIOUS_RELEASE_DIR
(`scripts/previous-release --install` makes one and prints its directory; .ci/run sets it).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from heimdex_api.auth import issue_token
from heimdex_db.localpg import free_port
from tests.dbutil import version_of
from tests.stack import FAST, SECRET, Processes, wait_for

from .conftest import HistoryCopy, clean_env, heimdex, url_arg

pytestmark = pytest.mark.slow  # the previous release's processes, the new API, an upgrade

RELEASE_DIR_ENV = "HEIMDEX_PREVIOUS_RELEASE_DIR"
ONLINE_EXPAND = "rollxpand001"
EXPAND = ("db", "upgrade", "--phase", "expand")
CLIENTS = 4
BATCH = 40  # submissions accepted between two steps of the deploy


@pytest.fixture
def release_cli() -> Path:
    given = os.environ.get(RELEASE_DIR_ENV)
    if not given:
        pytest.skip(
            f"{RELEASE_DIR_ENV} is not set: export {RELEASE_DIR_ENV}="
            "$(scripts/previous-release --install)"
        )
    cli = Path(given) / ".venv" / "bin" / "heimdex"
    if not cli.exists():
        pytest.fail(f"{RELEASE_DIR_ENV}={given} has no {cli}: run `uv sync --frozen` there")
    return cli


@dataclass
class Release:
    """The previous release's `heimdex` subcommands as processes, logs in files."""

    cli: Path
    env: dict[str, str]
    log_dir: Path
    running: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"release-{len(self.running)}-{args[0]}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(self.cli), *args], env=self.env, stdout=subprocess.DEVNULL, stderr=out
            )
        self.running.append((proc, log))
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        return next(log for p, log in self.running if p is proc).read_text()

    def stop_all(self) -> None:
        for proc, _ in self.running:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@dataclass
class Load:
    """Clients submitting without pause to the APIs in rotation, as behind a load balancer
    that drains an API before it stops."""

    headers: dict[str, str]
    ports: list[int] = field(default_factory=list)
    accepted: list[tuple[int, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    in_flight: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    _turn: int = 0

    def _pick(self) -> int:
        with self.lock:
            port = self.ports[self._turn % len(self.ports)]
            self._turn += 1
            self.in_flight[port] = self.in_flight.get(port, 0) + 1
            return port

    def _submit(self, port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            body = json.dumps({"type": "noop", "params": {}})
            conn.request("POST", "/jobs", body=body, headers=self.headers)
            resp = conn.getresponse()
            payload = resp.read()
            with self.lock:
                if resp.status == 201:
                    self.accepted.append((port, json.loads(payload)["id"]))
                else:
                    self.errors.append(f"{port}: {resp.status} {payload[:300]!r}")
        except OSError as exc:
            with self.lock:
                self.errors.append(f"{port}: {exc!r}")
        finally:
            conn.close()
            with self.lock:
                self.in_flight[port] -= 1

    def run(self) -> None:
        while not self.stop.is_set():
            self._submit(self._pick())

    def count(self, port: int | None = None) -> int:
        with self.lock:
            return sum(1 for p, _ in self.accepted if port is None or p == port)

    def more(self, n: int, port: int | None = None, *, what: str) -> None:
        target = self.count(port) + n

        def reached() -> bool:
            with self.lock:
                assert not self.errors, f"{len(self.errors)} failed submissions: {self.errors[:3]}"
            return self.count(port) >= target

        wait_for(reached, what=what, timeout=120)

    def drain(self, port: int) -> None:
        with self.lock:
            self.ports.remove(port)
        wait_for(lambda: self.in_flight.get(port, 0) == 0, what=f"requests in flight on {port}")


def _up(proc: subprocess.Popen[bytes], port: int, log: Callable[[], str]) -> bool:
    """The API answers /healthz; an API that exited fails at once, with its log."""
    assert proc.poll() is None, log()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _online_expand(history: HistoryCopy) -> None:
    """A test revision that works on the busy table online: a column, a concurrent index."""
    history.add_revision(
        ONLINE_EXPAND,
        history.head,
        """
        with online():
            add_columns("job", "ADD COLUMN IF NOT EXISTS rollout_note text")
            create_index("idx_job__rollout_note", "job", "(rollout_note)")
        """,
        """
        with online():
            drop_index("idx_job__rollout_note")
            ddl("ALTER TABLE job DROP COLUMN IF EXISTS rollout_note")
        """,
        header='phase = "expand"\n'
        "from heimdex_db.online import add_columns, create_index, ddl, drop_index, online",
    )


@pytest.fixture
def release(release_cli: Path, empty_db_url: URL, tmp_path: Path) -> Iterator[Release]:
    """The database as the previous release deployed it, and that release's processes."""
    env = clean_env(**FAST, DATABASE_URL=url_arg(empty_db_url), HEIMDEX_ENV="local")
    migrated = subprocess.run(
        [str(release_cli), "db", "upgrade"], env=env, capture_output=True, text=True, check=False
    )
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    procs = Release(release_cli, env, tmp_path)
    yield procs
    procs.stop_all()


@pytest.fixture
def new(release: Release, tmp_path: Path) -> Iterator[Processes]:
    """This checkout's processes, on the same database."""
    (tmp_path / "new").mkdir()
    procs = Processes(release.env, tmp_path / "new")
    yield procs
    procs.stop_all()


def test_the_previous_workers_beside_the_new_api_through_an_online_expand_lose_nothing(
    release: Release, new: Processes, history: HistoryCopy, empty_db_url: URL
) -> None:
    org = uuid.uuid4()
    load = Load(
        headers={
            "Authorization": f"Bearer {issue_token(SECRET, org_id=org, sub='rollout')}",
            "Content-Type": "application/json",
        }
    )
    clients = [threading.Thread(target=load.run, name=f"client-{i}") for i in range(CLIENTS)]
    try:
        # Before the deploy: the previous release's API and two of its workers.
        old_port = free_port()
        old_api = release.start("api", "--host", "127.0.0.1", "--port", str(old_port))
        workers = [release.start("worker") for _ in range(2)]
        wait_for(
            lambda: _up(old_api, old_port, lambda: release.log_of(old_api)),
            what="the previous release's API",
            timeout=300,
        )
        load.ports.append(old_port)
        for client in clients:
            client.start()
        load.more(BATCH, what="submissions before the upgrade")

        # The deploy's first step, online, under the load: the repository's expand revisions.
        expand = heimdex(*EXPAND, "--database-url", url_arg(empty_db_url))
        assert expand.returncode == 0, expand.stdout + expand.stderr
        load.more(BATCH, what="submissions after the upgrade")
        # The test revision follows what the expand reached (a revision of no phase ends it).
        reached = version_of(empty_db_url)
        assert reached is not None
        history.truncate_after(reached)
        _online_expand(history)

        # The new API joins the previous one; the old workers run every job.
        new_port = free_port()
        new_api = new.start("api", "--host", "127.0.0.1", "--port", str(new_port))
        wait_for(
            lambda: _up(new_api, new_port, lambda: new.log_of(new_api)),
            what="the new API",
            timeout=300,
        )
        with load.lock:
            load.ports.append(new_port)
        load.more(BATCH, new_port, what="submissions to the new API beside the previous one")

        # An online expand revision on the busy table, beside both APIs and the old workers.
        online = heimdex(*EXPAND, "-c", history.ini, "--database-url", url_arg(empty_db_url))
        assert online.returncode == 0, online.stdout + online.stderr
        assert version_of(empty_db_url) == ONLINE_EXPAND, online.stdout
        load.more(BATCH, new_port, what="submissions to the new API after the online revision")

        # The previous API is drained and stopped; the old workers stay.
        load.drain(old_port)
        old_api.terminate()
        # Uvicorn finishes its requests, then ends by the signal it was sent.
        assert old_api.wait(timeout=30) in (0, -signal.SIGTERM), release.log_of(old_api)
        load.more(BATCH, new_port, what="submissions to the new API alone")
    finally:
        load.stop.set()
        for client in clients:
            if client.is_alive():
                client.join()
    assert load.errors == []
    ids = {job_id for _, job_id in load.accepted}
    assert len(ids) == len(load.accepted)

    engine = create_engine(empty_db_url)
    try:

        def all_done() -> bool:
            with engine.connect() as conn:
                done = conn.execute(
                    text("SELECT count(*) FROM job WHERE org_id = :org AND status = 'succeeded'"),
                    {"org": org},
                ).scalar_one()
            return done == len(ids)

        wait_for(all_done, what="the previous release's workers to finish every job", timeout=180)
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT j.id::text, j.status, j.attempt, count(e.*) FILTER "
                    "(WHERE e.next_status = 'running') FROM job j "
                    "LEFT JOIN job_event e ON e.job_id = j.id "
                    "WHERE j.org_id = :org GROUP BY j.id"
                ),
                {"org": org},
            ).all()
    finally:
        engine.dispose()
    assert {row[0] for row in rows} == ids  # none lost, none made up
    # Done, on its first attempt (0), started once.
    assert {(row[1], row[2], row[3]) for row in rows} == {("succeeded", 0, 1)}
    for worker in workers:
        assert worker.poll() is None, release.log_of(worker)
        assert '"level": "error"' not in release.log_of(worker)
    assert '"level": "error"' not in new.log_of(new_api)
