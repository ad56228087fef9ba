"""The queue's guarantees, each on real PostgreSQL with real processes: no accepted job is
stranded by a database restart or outage or by a worker killed holding a batch; several workers
never run a job twice at once nor skip one; priority and per-org fairness hold."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from heimdex.ledger import repository
from heimdex.settings import Settings
from heimdex_api.app import create_app
from heimdex_db.config import alembic_config
from heimdex_db.localpg import LocalPostgres, free_port
from tests.stack import FAST, Processes, auth, wait_for

pytestmark = pytest.mark.slow  # worker processes, faults

POLL = 0.2


def _count(engine: Engine, sql: str, **params: object) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar() or 0)


def _batch(client: TestClient, org: uuid.UUID, jobs: list[dict[str, object]]) -> list[str]:
    ids: list[str] = []
    for i in range(0, len(jobs), 1000):
        resp = client.post("/jobs/batch", json={"jobs": jobs[i : i + 1000]}, headers=auth(org))
        assert resp.status_code == 201, resp.text
        ids += [item["job"]["id"] for item in resp.json()["items"]]
    return ids


def _actions(engine: Engine, job_id: str) -> list[tuple[str | None, str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT prev_status, next_status, detail_json->>'action' AS action"
                " FROM job_event WHERE job_id = :id ORDER BY ts, id"
            ),
            {"id": job_id},
        ).all()
    return [(r.prev_status, r.next_status, r.action) for r in rows]


def _chained(events: list[tuple[str | None, str, str]]) -> bool:
    """Every event starts where the previous one ended."""
    return all(events[i][0] == events[i - 1][1] for i in range(1, len(events)))


# A cluster of the test's own, so it can be restarted without touching the session's.


@dataclass
class OwnDatabase:
    pg: LocalPostgres
    url: URL
    engine: Engine
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture
def own_db() -> Iterator[OwnDatabase]:
    pg = LocalPostgres.throwaway().start()
    try:
        url = pg.create_database("ledger")
        command.upgrade(alembic_config(database_url=url), "head")
        engine = create_engine(url)
        env = {
            **FAST,
            "HEIMDEX_POLL_INTERVAL_SECONDS": str(POLL),
            "DATABASE_URL": url.render_as_string(hide_password=False),
            "HEIMDEX_ENV": "local",
        }
        yield OwnDatabase(pg, url, engine, env)
        engine.dispose()
    finally:
        pg.destroy()


class Submitter(threading.Thread):
    """POSTs jobs at a steady rate through the real API; keeps the ids of the 2xx answers."""

    def __init__(self, port: int, token_headers: dict[str, str], per_second: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.headers = {**token_headers, "Content-Type": "application/json"}
        self.interval = 1 / per_second
        self.accepted: list[str] = []
        self.refused = 0
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        n = 0
        while not self.stop.wait(self.interval):
            n += 1
            body = {"type": "noop"} if n % 2 else {
                "type": "mock_process", "params": {"stage_seconds": 0.01},
            }  # fmt: skip
            try:
                conn.request("POST", "/jobs", body=json.dumps(body), headers=self.headers)
                resp = conn.getresponse()
                payload = resp.read()
            except (OSError, http.client.HTTPException):
                self.refused += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                continue
            if 200 <= resp.status < 300:
                self.accepted.append(json.loads(payload)["id"])
            else:
                self.refused += 1
        conn.close()


def _serve_api(processes: Processes, env: dict[str, str]) -> int:
    port = free_port()
    processes.start("api", "--port", str(port), env=env)

    def healthy() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    wait_for(healthy, what="the API to be ready")
    return port


@pytest.mark.parametrize("outage", ["restart", "ten-second-stop"])
def test_postgres_restart_under_steady_submission_strands_no_accepted_job(
    own_db: OwnDatabase, processes: Processes, outage: str
) -> None:
    port = _serve_api(processes, own_db.env)
    processes.start("worker", env=own_db.env)
    submitter = Submitter(port, auth(uuid.uuid4()), per_second=20)
    submitter.start()
    # Steady submission before and after the outage, however slow the machine: a count of
    # accepted jobs rather than seconds of sleep.
    wait_for(lambda: len(submitter.accepted) >= 30, what="submissions before the outage")
    if outage == "restart":
        own_db.pg.stop()
        own_db.pg.start()
    else:
        own_db.pg.stop()
        time.sleep(10)
        own_db.pg.start()
    back = time.time()
    time.sleep(3)
    before = len(submitter.accepted)
    wait_for(lambda: len(submitter.accepted) >= before + 25, what="submissions after the outage")
    submitter.stop.set()
    submitter.join()
    accepted = submitter.accepted
    assert len(accepted) > 50, (len(accepted), submitter.refused)
    if outage == "ten-second-stop":  # the outage was real: submissions were refused meanwhile
        assert submitter.refused > 50, submitter.refused

    def unfinished() -> list[str]:
        with own_db.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id::text FROM job WHERE id = ANY(CAST(:ids AS uuid[]))"
                    " AND status <> 'succeeded'"
                ),
                {"ids": accepted},
            ).all()
        return [r[0] for r in rows]

    wait_for(lambda: not unfinished(), what="every accepted job to succeed", timeout=60)
    # None waited in the queue, once the database was back, for longer than a poll or two
    # (plus the lease of an attempt whose outcome the outage voided).
    late = _count(
        own_db.engine,
        """
SELECT count(*) FROM job_event AS e JOIN job AS j ON j.id = e.job_id
 WHERE j.id = ANY(CAST(:ids AS uuid[])) AND e.detail_json->>'action' = 'claimed'
   AND e.ts > greatest(j.created_at, to_timestamp(:back)) + make_interval(secs => :bound)""",
        ids=accepted,
        back=back,
        bound=float(FAST["HEIMDEX_LEASE_SECONDS"]) + 4 * POLL + 3,
    )
    assert late == 0
    worker, api = processes.running[1], processes.running[0]
    assert worker.poll() is None and api.poll() is None  # nothing was restarted


def test_a_worker_killed_holding_a_batch_loses_no_job(
    own_db: OwnDatabase, processes: Processes
) -> None:
    engine = own_db.engine
    org = uuid.uuid4()
    with _api_client(own_db) as client:
        ids = _batch(client, org, [{"type": "mock_process", "params": {"stage_seconds": 0.5}}] * 5)
    doomed = processes.start("worker", "--concurrency", "5", "--batch", "5", env=own_db.env)
    wait_for(
        lambda: _count(engine, "SELECT count(*) FROM job WHERE status = 'running'") == 5,
        what="the batch of 5 to be running",
    )
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    processes.start("worker", env=own_db.env)
    wait_for(
        lambda: _count(engine, "SELECT count(*) FROM job WHERE status = 'succeeded'") == 5,
        what="the killed batch to succeed on the other worker",
    )
    for job_id in ids:
        events = _actions(engine, job_id)
        actions = [a for _, _, a in events]
        assert actions[:2] == ["submitted", "claimed"]
        assert actions.count("lease_expired") == 1 and actions.count("claimed") == 2
        assert actions[-1] == "succeeded"
        assert _chained(events), events
    assert _count(engine, "SELECT min(attempt) FROM job") == 1


def _api_client(db: OwnDatabase) -> TestClient:
    settings = Settings.model_validate(
        {"DATABASE_URL": db.env["DATABASE_URL"], "HEIMDEX_JWT_SECRET": FAST["HEIMDEX_JWT_SECRET"]}
    )
    return TestClient(create_app(settings))


def test_eight_workers_run_every_job_exactly_once(
    client: TestClient, processes: Processes, engine: Engine
) -> None:
    # Exactly once needs leases that outlast a loaded machine's stalls: an expired 1 s lease
    # would (rightly) run its job again.
    steady = {"HEIMDEX_LEASE_SECONDS": "30", "HEIMDEX_HEARTBEAT_SECONDS": "2"}
    for _ in range(8):
        processes.start("worker", "--concurrency", "2", "--batch", "5", env=steady)
    # Every worker listening before the jobs arrive: one worker alone drains 2,000 no-op jobs
    # faster than seven more processes start.
    wait_for(
        lambda: (
            _count(
                engine,
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN heimdex_jobs%'",
            )
            == 8
        ),
        what="8 workers listening",
        timeout=120,  # eight processes importing at once on a loaded 2-core CI machine
    )
    ids = _batch(client, uuid.uuid4(), [{"type": "noop"}] * 2000)
    wait_for(
        lambda: _count(engine, "SELECT count(*) FROM job WHERE status = 'succeeded'") == 2000,
        what="2000 jobs to succeed",
        timeout=120,
    )
    with engine.connect() as conn:
        per_job = conn.execute(
            text("""
SELECT j.id, j.attempt,
       count(*) FILTER (WHERE e.detail_json->>'action' = 'claimed') AS claims,
       count(*) FILTER (WHERE e.next_status = 'succeeded') AS successes
  FROM job AS j JOIN job_event AS e ON e.job_id = j.id
 GROUP BY j.id, j.attempt""")
        ).all()
        workers = conn.execute(
            text(
                "SELECT count(DISTINCT detail_json->>'worker') FROM job_event"
                " WHERE detail_json->>'action' = 'claimed'"
            )
        ).scalar()
    assert len(per_job) == len(ids)
    assert {(r.attempt, r.claims, r.successes) for r in per_job} == {(0, 1, 1)}
    assert workers is not None and workers > 1  # they really shared the work


def test_a_backlog_that_came_due_unplaced_is_placed_and_run_once(
    processes: Processes, engine: Engine
) -> None:
    """Jobs that came due without a turn (retries, requeues, scheduled jobs: here two and a
    half placing batches over 50 orgs) wait until a worker's placing step gives them turns;
    two workers place and run them all, each once."""
    n = 5 * repository.PLACE_BATCH // 2
    with engine.begin() as conn:
        conn.execute(
            text("""
INSERT INTO job (org_id, type, attempt, run_at)
SELECT (CAST(:orgs AS uuid[]))[1 + g % 50], 'noop', 1, now() - make_interval(secs => g)
  FROM generate_series(1, :n) AS g"""),
            {"orgs": [uuid.uuid4() for _ in range(50)], "n": n},
        )
    for _ in range(2):
        processes.start("worker", "--concurrency", "2", "--batch", "5")
    wait_for(
        lambda: _count(engine, "SELECT count(*) FROM job WHERE status = 'succeeded'") == n,
        what=f"{n} jobs to succeed",
        timeout=120,
    )
    runs = _count(
        engine,
        "SELECT count(*) FROM job_event WHERE detail_json->>'action' = 'claimed'",
    )
    assert runs == n  # a claim takes placed jobs only: each was placed, then run once


def test_priority_first_then_round_robin_across_orgs(
    client: TestClient, processes: Processes, engine: Engine
) -> None:
    bulk, other = uuid.uuid4(), uuid.uuid4()
    _batch(client, bulk, [{"type": "noop"}] * 10_000)
    (late,) = _batch(client, other, [{"type": "noop"}])
    (urgent,) = _batch(client, bulk, [{"type": "noop", "priority": 5}])
    worker = processes.start("worker", "--concurrency", "1", "--batch", "10")
    wait_for(
        lambda: _count(engine, "SELECT count(*) FROM job WHERE status = 'succeeded'") >= 30,
        what="the first claims",
    )
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    with engine.connect() as conn:
        order = [
            str(r[0])
            for r in conn.execute(
                text(
                    "SELECT job_id FROM job_event WHERE detail_json->>'action' = 'claimed'"
                    " ORDER BY ts, id LIMIT 30"
                )
            )
        ]
    assert order[0] == urgent
    # The other org's one job waited at most about one claim batch behind 10,000 of bulk's.
    assert late in order[:11], order.index(late) if late in order else "not claimed"


def test_a_short_jobs_outcome_is_written_while_a_long_job_runs_after_it(
    client: TestClient, processes: Processes, engine: Engine
) -> None:
    """One runner claims short jobs and a long one in one batch: the short jobs' outcomes are
    written (by the keeper) while the long job still runs, not once it ends."""
    org = uuid.uuid4()
    shorts = _batch(client, org, [{"type": "noop"}] * 4)  # due first, so claimed first
    (long_job,) = _batch(client, org, [{"type": "mock_process", "params": {"stage_seconds": 3.0}}])
    processes.start("worker", "--concurrency", "1", "--batch", "10")
    wait_for(
        lambda: (
            _count(engine, "SELECT count(*) FROM job WHERE status = 'running'") == 1
            and _count(engine, "SELECT count(*) FROM job WHERE status = 'succeeded'") == 4
        ),
        what="the short jobs written while the long one runs (after it, this cannot hold)",
    )
    running = _count(
        engine, "SELECT count(*) FROM job WHERE id = :id AND status = 'running'", id=long_job
    )
    assert running == 1  # the long job (9 s in all) has not ended yet
    assert (
        _count(
            engine,
            "SELECT count(*) FROM job WHERE id::text = ANY(:ids) AND status = 'succeeded'",
            ids=shorts,
        )
        == 4
    )


def test_run_at_defers_the_claim(client: TestClient, processes: Processes, engine: Engine) -> None:
    processes.start("worker")
    due = time.time() + 2
    run_at = datetime.fromtimestamp(due, UTC).isoformat()
    resp = client.post("/jobs", json={"type": "noop", "run_at": run_at}, headers=auth(uuid.uuid4()))
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["id"]
    wait_for(
        lambda: _count(engine, "SELECT count(*) FROM job WHERE status = 'succeeded'") == 1,
        what="the deferred job",
    )
    claimed = _count(
        engine,
        "SELECT extract(epoch FROM ts) * 1000 FROM job_event"
        " WHERE job_id = :id AND detail_json->>'action' = 'claimed'",
        id=job_id,
    )
    assert claimed >= int(due * 1000) - 1


@pytest.mark.parametrize(
    ("listen", "poll"), [("true", "30"), ("false", "0.3")], ids=["notify", "polling-only"]
)
def test_an_idle_worker_wakes_on_notify_or_by_polling(
    client: TestClient, processes: Processes, engine: Engine, listen: str, poll: str
) -> None:
    worker = processes.start(
        "worker", env={"HEIMDEX_LISTEN": listen, "HEIMDEX_POLL_INTERVAL_SECONDS": poll}
    )
    time.sleep(1.5)  # started and idle: its first look at the queue found nothing
    assert worker.poll() is None, processes.log_of(worker)
    (job_id,) = _batch(client, uuid.uuid4(), [{"type": "noop"}])
    started = time.monotonic()
    wait_for(
        lambda: _count(engine, "SELECT count(*) FROM job WHERE status = 'succeeded'") == 1,
        what="the job to run",
        timeout=10,  # far below the 30 s poll: only a NOTIFY can wake it this early
    )
    assert time.monotonic() - started < 10
    assert job_id


def test_worker_refuses_to_start_with_a_type_it_cannot_run(
    processes: Processes, tmp_path: Path
) -> None:
    module = tmp_path / "declared_only.py"
    module.write_text(
        "from pydantic import BaseModel\n"
        "from heimdex.ledger.registry import JobTypes\n"
        "class P(BaseModel):\n    x: int\n"
        "jobs = JobTypes()\n"
        "jobs.declare('transcode', params=P)\n"
    )
    proc = processes.start(
        "worker",
        env={"HEIMDEX_JOB_MODULES": "declared_only:jobs", "PYTHONPATH": str(tmp_path)},
    )
    assert proc.wait(timeout=30) == 1
    log = processes.log_of(proc)
    assert "transcode" in log and "without a handler" in log
    assert "Traceback" not in log
