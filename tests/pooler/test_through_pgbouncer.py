"""The API, workers and `heimdex db` through a real pgbouncer, in transaction and in session
mode: every request answered 2xx, every job run, nothing lost to a server-side prepared
statement or a session setting the pooler hands to another client."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from heimdex.db import make_engine, rows_with_local_settings
from heimdex.ledger import repository, service
from heimdex.ledger.registry import load_registry
from heimdex.settings import PoolMode
from heimdex_db.localpg import free_port
from tests.inprocess import heimdex
from tests.pooler.conftest import PgbouncerFactory
from tests.stack import Processes, auth, wait_for

pytestmark = pytest.mark.slow  # pgbouncer, the API and workers as processes

CLIENTS = 4
REQUESTS_PER_CLIENT = 150  # half submits, half reads: 600 requests, 300 jobs


def _url(url: URL) -> str:
    return url.render_as_string(hide_password=False)


@pytest.fixture
def direct(db_url: URL) -> Iterator[Engine]:
    engine = create_engine(db_url)
    yield engine
    engine.dispose()


class Client(threading.Thread):
    """Submits a job and reads it back, `REQUESTS_PER_CLIENT` requests in all; counts every
    answer by status (and problem type) and keeps the ids of the jobs accepted."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.headers = {**headers, "Content-Type": "application/json"}
        self.answers: Counter[str] = Counter()
        self.accepted: list[str] = []

    def _request(
        self, conn: http.client.HTTPConnection, method: str, path: str, body: object = None
    ) -> dict[str, object] | None:
        payload = None if body is None else json.dumps(body)
        conn.request(method, path, body=payload, headers=self.headers)
        resp = conn.getresponse()
        data = resp.read()
        if 200 <= resp.status < 300:
            self.answers["2xx"] += 1
            parsed: dict[str, object] = json.loads(data)
            return parsed
        kind = json.loads(data).get("type", "") if data.startswith(b"{") else ""
        self.answers[f"{resp.status} {kind}".strip()] += 1
        return None

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        for _ in range(REQUESTS_PER_CLIENT // 2):
            try:
                job = self._request(conn, "POST", "/jobs", {"type": "noop"})
                if job is None:
                    self.answers["skipped read"] += 1
                    continue
                self.accepted.append(str(job["id"]))
                self._request(conn, "GET", f"/jobs/{job['id']}")
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self.answers[type(exc).__name__] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.close()


def _serve_api(processes: Processes, env: dict[str, str]) -> int:
    port = free_port()
    processes.start("api", "--port", str(port), env=env)

    def ready() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    wait_for(ready, what="the API to be ready", timeout=60)
    return port


def _drive(processes: Processes, env: dict[str, str], direct: Engine) -> list[Client]:
    """The API and two workers on `env`; four clients at once; returns when every accepted job
    has run (or the wait gives up)."""
    port = _serve_api(processes, env)
    workers = [processes.start("worker", "--concurrency", "2", "--batch", "4", env=env)
               for _ in range(2)]  # fmt: skip
    org = uuid.uuid4()
    clients = [Client(port, auth(org)) for _ in range(CLIENTS)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=300)
    accepted = [job for client in clients for job in client.accepted]

    def finished() -> bool:
        with direct.connect() as conn:
            done = conn.execute(
                text("SELECT count(*) FROM job WHERE status = 'succeeded'")
            ).scalar_one()
        return done >= len(accepted)

    try:
        wait_for(finished, what="every accepted job to succeed", timeout=120)
    except AssertionError:
        logs = "\n".join(processes.log_of(w)[-1500:] for w in workers)
        raise AssertionError(f"jobs left unfinished; worker logs:\n{logs}") from None
    return clients


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_four_clients_and_two_workers_through_pgbouncer_see_no_error(
    pgbouncer: PgbouncerFactory, processes: Processes, db_url: URL, direct: Engine, mode: str
) -> None:
    """4 concurrent clients submitting and reading, 2 workers claiming, through pgbouncer: in
    transaction mode its 4 server connections serve every client's transactions in turn, so a
    statement prepared by one client, or a session setting, lands on another's."""
    size = 4 if mode == "transaction" else 80  # session mode: a server connection per client
    bouncer = pgbouncer(pool_mode=mode, default_pool_size=size)
    env = {"DATABASE_URL": _url(bouncer.url(db_url.database or "")), "HEIMDEX_DB_POOL_MODE": mode}
    clients = _drive(processes, env, direct)
    answers = sum((c.answers for c in clients), Counter())
    assert answers == Counter({"2xx": CLIENTS * REQUESTS_PER_CLIENT}), answers
    with direct.connect() as conn:
        statuses = dict(
            conn.execute(text("SELECT status::text, count(*) FROM job GROUP BY 1")).all()
        )
    assert statuses == {"succeeded": CLIENTS * REQUESTS_PER_CLIENT // 2}, statuses


def _listeners(direct: Engine) -> int:
    with direct.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query LIKE 'LISTEN heimdex_jobs%'"
                )
            ).scalar_one()
        )


def test_a_worker_behind_a_transaction_pooler_listens_on_the_session_url_or_says_it_polls(
    pgbouncer: PgbouncerFactory, processes: Processes, db_url: URL, direct: Engine
) -> None:
    """LISTEN through a transaction pooler reaches a server connection the pooler hands to
    others: the worker listens on HEIMDEX_SESSION_DATABASE_URL, or polls and says so."""
    bouncer = pgbouncer(pool_mode="transaction")
    pooled = {"DATABASE_URL": _url(bouncer.url(db_url.database or "")),
              "HEIMDEX_DB_POOL_MODE": "transaction"}  # fmt: skip
    polling = processes.start("worker", env=pooled)
    wait_for(lambda: "worker.polling" in processes.log_of(polling), what="the worker to start")
    log = processes.log_of(polling)
    assert log.count("worker.polling") == 1, log
    assert "HEIMDEX_SESSION_DATABASE_URL" in log
    assert _listeners(direct) == 0
    processes.start("worker", env={**pooled, "HEIMDEX_SESSION_DATABASE_URL": _url(db_url)})
    wait_for(lambda: _listeners(direct) == 1, what="the worker to LISTEN on the direct URL")


def _heimdex(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`heimdex ARGS` in this process (tests/inprocess.py), with `env` over this environment."""
    return heimdex(*args, cwd=Path.cwd(), env={**os.environ, **env})


def test_heimdex_db_refuses_a_transaction_pooler_and_runs_through_a_session_one(
    pgbouncer: PgbouncerFactory, stack_env: dict[str, str], db_url: URL, direct: Engine
) -> None:
    """Its migration lock is a session advisory lock: through a transaction pooler it would be
    taken on one server connection and released (or not) on another."""
    database = db_url.database or ""
    transaction = pgbouncer(pool_mode="transaction")
    pooled = {**stack_env, "DATABASE_URL": _url(transaction.url(database)),
              "HEIMDEX_DB_POOL_MODE": "transaction"}  # fmt: skip
    with direct.begin() as conn:
        before = conn.execute(text("SELECT version_num FROM heimdex_private.alembic_version")).all()
    refused = _heimdex(pooled, "db", "upgrade")
    assert refused.returncode == 1, refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "transaction pooler" in lines[0], refused.stderr
    assert "--database-url" in lines[0] and "HEIMDEX_SESSION_DATABASE_URL" in lines[0]
    assert "Traceback" not in refused.stderr
    with direct.begin() as conn:
        after = conn.execute(text("SELECT version_num FROM heimdex_private.alembic_version")).all()
    assert after == before
    # Given a session URL beside the pooler's, or a direct one, it runs.
    with_session = _heimdex(
        {**pooled, "HEIMDEX_SESSION_DATABASE_URL": _url(db_url)}, "db", "status"
    )
    assert with_session.returncode == 0, with_session.stderr
    explicit = _heimdex(pooled, "db", "status", "--database-url", _url(db_url))
    assert explicit.returncode == 0, explicit.stderr
    session = pgbouncer(pool_mode="session")
    through_session = {**stack_env, "DATABASE_URL": _url(session.url(database)),
                       "HEIMDEX_DB_POOL_MODE": "session"}  # fmt: skip
    through = _heimdex(through_session, "db", "upgrade")
    assert through.returncode == 0, through.stderr


def test_the_claim_through_a_transaction_pooler_sets_jit_off_for_itself_only(
    pgbouncer: PgbouncerFactory, db_url: URL, admin_engine: Engine
) -> None:
    """Behind a transaction pooler JIT off cannot be a session setting (the next transaction
    may run on another server connection): the claim carries it as SET LOCAL in its own
    message, and leaves nothing behind on the server connection the pooler hands on."""
    database = db_url.database or ""
    with admin_engine.connect() as admin:
        # The server's log shows each message as it arrived (the tests' clusters log to
        # postgres.log beside their data directory).
        admin.exec_driver_sql(f"ALTER DATABASE \"{database}\" SET log_statement = 'all'")
        log = Path(admin.exec_driver_sql("SHOW data_directory").scalar_one()).parent
    log /= "postgres.log"
    logged_from = log.stat().st_size
    bouncer = pgbouncer(pool_mode="transaction", default_pool_size=1)
    engine = make_engine(bouncer.url(database), pool_mode=PoolMode.TRANSACTION)
    registry = load_registry()
    org = uuid.uuid4()
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            driver = conn.connection.driver_connection
            assert driver is not None
            assert driver.execute("SHOW jit").fetchone() == ("on",)
            assert rows_with_local_settings(driver, "SELECT current_setting('jit')", {}) == [
                ("off",)
            ]
            for _ in range(6):  # past psycopg's prepare threshold
                service.submit_jobs(conn, registry, org_id=org, specs=[service.JobSpec("noop", {})])
            claimed = [
                repository.claim(conn, worker_id="it's me", limit=2, lease_seconds=30.5)
                for _ in range(3)
            ]
            assert [len(c.jobs) for c in claimed] == [2, 2, 2]
            assert driver.execute("SHOW jit").fetchone() == ("on",)
            prepared = driver.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
            assert prepared == (0,)
            leased = (
                conn.execute(text("SELECT DISTINCT leased_by FROM job WHERE status = 'running'"))
                .scalars()
                .all()
            )
            assert leased == ["it's me"]
    finally:
        engine.dispose()
    with log.open("rb") as lines:
        lines.seek(logged_from)
        # Simple protocol: "statement: ..."; extended: "execute <name>: ...".
        statements = re.split(r"LOG:  (?:statement|execute [^:]*): ", lines.read().decode())[1:]
    claims = [text for text in statements if "'action', 'claimed'" in text]
    assert len(claims) == 3, statements
    assert all(text.startswith("SET LOCAL jit = off; ") for text in claims), claims


RETENTION = {
    "HEIMDEX_RETENTION_SUCCEEDED": "1s",
    "HEIMDEX_RETENTION_INTERVAL_SECONDS": "0.2",
}


def test_behind_a_transaction_pooler_the_keeper_prunes_over_the_session_url_or_says_it_cannot(
    pgbouncer: PgbouncerFactory, processes: Processes, db_url: URL, direct: Engine
) -> None:
    """Retention's one-pruner-at-a-time lock is a session advisory lock: through a transaction
    pooler it would be taken on one server connection and released on another (or never)."""
    bouncer = pgbouncer(pool_mode="transaction")
    pooled = {**RETENTION, "DATABASE_URL": _url(bouncer.url(db_url.database or "")),
              "HEIMDEX_DB_POOL_MODE": "transaction", "HEIMDEX_LISTEN": "false"}  # fmt: skip
    idle = processes.start("worker", env=pooled)
    wait_for(lambda: "worker.started" in processes.log_of(idle), what="the worker to start")
    with direct.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO job (org_id, type, status, finished_at)"
                " VALUES (gen_random_uuid(), 'noop', 'succeeded', now() - interval '1 day')"
            )
        )
    processes.start("worker", env={**pooled, "HEIMDEX_SESSION_DATABASE_URL": _url(db_url)})

    def pruned() -> bool:
        with direct.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM job")).scalar_one() == 0

    wait_for(pruned, what="the old job to be pruned")
    assert processes.log_of(idle).count("retention.no_session") == 1


def test_heimdex_jobs_prune_refuses_a_transaction_pooler_without_a_session_url(
    pgbouncer: PgbouncerFactory, stack_env: dict[str, str], db_url: URL, direct: Engine
) -> None:
    with direct.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO job (org_id, type, status, finished_at)"
                " VALUES (gen_random_uuid(), 'noop', 'succeeded', now() - interval '90 days')"
            )
        )
    bouncer = pgbouncer(pool_mode="transaction")
    pooled = {**stack_env, "DATABASE_URL": _url(bouncer.url(db_url.database or "")),
              "HEIMDEX_DB_POOL_MODE": "transaction"}  # fmt: skip
    refused = _heimdex(pooled, "jobs", "prune")
    assert refused.returncode == 1, refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "HEIMDEX_SESSION_DATABASE_URL" in lines[0], refused.stderr
    with direct.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM job")).scalar_one() == 1
    pruned = _heimdex({**pooled, "HEIMDEX_SESSION_DATABASE_URL": _url(db_url)}, "jobs", "prune")
    assert pruned.returncode == 0, pruned.stderr
    with direct.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM job")).scalar_one() == 0
