"""Long jobs on real PostgreSQL: execution timeouts (a handler told to stop, its child processes
terminated then killed, a stuck handler's slot given back and its late outcome void) and
resumable jobs (checkpoints survive a SIGTERM, a SIGKILL and a retry; an operator may start
from scratch)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from heimdex.cli import main
from heimdex.ledger import builtin, operations, service
from heimdex.ledger.errors import LedgerError
from heimdex.ledger.registry import JobContext, JobTypes, Registry
from heimdex.metrics import LedgerMetrics
from heimdex.settings import Settings
from heimdex_api.app import create_app
from heimdex_api.auth import ADMIN_ROLE, issue_token
from heimdex_worker.metrics import WorkerMetrics
from heimdex_worker.runtime import EXIT_ALL_STUCK, Worker
from tests.stack import SECRET, Processes, auth, wait_for

TYPES = "tests.worker.long_jobs_types:jobs"
REPO = Path(__file__).resolve().parents[2]


class Empty(BaseModel):
    pass


@dataclass
class Running:
    worker: Worker
    thread: threading.Thread
    stop: threading.Event
    code: list[int]

    def metric(self, name: str, **labels: str) -> float:
        value = self.worker.metrics.ledger.registry.get_sample_value(name, labels)
        return float(value or 0.0)


@pytest.fixture
def run_worker(settings: Settings, engine: Engine) -> Iterator[Any]:
    started: list[Running] = []

    def start(types: JobTypes, *, concurrency: int = 1, grace: float = 0.5) -> Running:
        registry = Registry([("builtin", builtin.jobs), ("tests", types)])
        worker = Worker(
            settings.model_copy(update={"timeout_grace_seconds": grace}),
            engine,
            registry,
            session_engine=engine,
            worker_id=f"test-{uuid.uuid4()}",
            concurrency=concurrency,
            batch=1,
            metrics=WorkerMetrics(LedgerMetrics(engine)),
        )
        stop = threading.Event()
        code: list[int] = []
        thread = threading.Thread(target=lambda: code.append(worker.run(stop)), daemon=True)
        thread.start()
        running = Running(worker, thread, stop, code)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop.set()
        running.thread.join(timeout=30)


def _submit(engine: Engine, registry: Registry, org: uuid.UUID, type_: str, **spec: Any) -> str:
    with engine.begin() as conn:
        submitted = service.submit_job(
            conn, registry, org_id=org, spec=service.JobSpec(type=type_, params={}, **spec)
        )
    return str(submitted.job.id)


def _row(engine: Engine, job_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(text("SELECT * FROM job WHERE id = :id"), {"id": job_id}).one()


def _events(engine: Engine, job_id: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT detail_json FROM job_event WHERE job_id = :id ORDER BY ts, id"),
            {"id": job_id},
        ).all()
    return [dict(r.detail_json or {}) for r in rows]


def _status(engine: Engine, job_id: str, *statuses: str) -> Any:
    row = _row(engine, job_id)
    return row if row.status in statuses else None


def _alive(pid: int) -> bool:
    """Whether a process with this PID runs (a zombie does not: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


# Execution timeouts.


def test_a_handler_sleeping_past_its_timeout_ends_timeout_its_slot_runs_on_and_its_return_is_void(
    run_worker: Any, engine: Engine, org_id: uuid.UUID, client: TestClient
) -> None:
    types = JobTypes()
    entered, release, returned = threading.Event(), threading.Event(), threading.Event()

    @types.register("sleeper", params=Empty, timeout=1)
    def sleeper(ctx: JobContext, params: Empty) -> dict[str, Any]:
        entered.set()
        release.wait(120)  # ignores its context: stuck
        returned.set()
        return {"late": True}

    blocking, unblock = threading.Event(), threading.Event()

    @types.register("blocker", params=Empty)
    def blocker(ctx: JobContext, params: Empty) -> dict[str, Any]:
        blocking.set()
        unblock.wait(120)
        return {}

    # Two slots: one holds a blocker throughout, so only the stuck handler's slot is free.
    running = run_worker(types, concurrency=2)
    registry = running.worker.registry
    _submit(engine, registry, org_id, "blocker")
    assert blocking.wait(30)
    stuck_id = _submit(engine, registry, org_id, "sleeper", max_attempts=1)
    assert entered.wait(30)
    next_id = _submit(engine, registry, org_id, "noop")

    # The stuck handler's slot runs the next job while the handler still sleeps.
    try:
        wait_for(lambda: _status(engine, next_id, "succeeded"), what="the next job on the slot")
    finally:
        unblock.set()
    assert not returned.is_set()
    row = wait_for(lambda: _status(engine, stuck_id, "dead_letter"), what="the TIMEOUT")
    assert row.last_error_code == "TIMEOUT" and "stuck" in row.last_error_message
    assert row.lease_token is None
    failed = [e for e in _events(engine, stuck_id) if e.get("action") == "attempt_failed"]
    assert [(e["error"]["code"], e.get("stuck")) for e in failed] == [("TIMEOUT", True)]
    assert running.metric("heimdex_worker_stuck_jobs") == 1
    assert running.metric("heimdex_worker_stuck_attempts_total", type="sleeper") == 1
    token = issue_token(SECRET, org_id=org_id, sub="op", role=ADMIN_ROLE)
    assert client.post("/ui/signin", data={"token": token}).status_code == 200
    page = client.get(f"/ui/jobs/{stuck_id}")
    assert page.status_code == 200 and "the handler did not stop" in page.text

    # Its late return changes nothing.
    events_before = _events(engine, stuck_id)
    release.set()
    assert returned.wait(30)
    wait_for(lambda: running.metric("heimdex_worker_stuck_jobs") == 0, what="the thread back")
    after = _row(engine, stuck_id)
    assert (after.status, after.updated_at, after.result) == ("dead_letter", row.updated_at, None)
    assert _events(engine, stuck_id) == events_before


def test_a_handler_that_checks_stops_at_its_deadline_and_is_retried_by_its_policy(
    run_worker: Any, engine: Engine, org_id: uuid.UUID
) -> None:
    types = JobTypes()

    @types.register("looper", params=Empty, timeout="1h")
    def looper(ctx: JobContext, params: Empty) -> dict[str, Any]:
        while True:
            ctx.check()
            threading.Event().wait(0.02)

    running = run_worker(types, concurrency=1)
    # The submission lowers the type's hour to one second.
    job_id = _submit(
        engine, running.worker.registry, org_id, "looper", max_attempts=2, timeout_seconds=1
    )
    row = wait_for(lambda: _status(engine, job_id, "dead_letter"), what="two timeouts")
    assert (row.attempt, row.last_error_code, row.timeout_seconds) == (2, "TIMEOUT", 1)
    failed = [e for e in _events(engine, job_id) if e.get("action") == "attempt_failed"]
    assert [(e["error"]["code"], e.get("stuck")) for e in failed] == [
        ("TIMEOUT", None),
        ("TIMEOUT", None),
    ]
    assert running.metric("heimdex_worker_stuck_jobs") == 0


def test_a_child_process_past_the_deadline_is_terminated(
    run_worker: Any, engine: Engine, org_id: uuid.UUID
) -> None:
    types = JobTypes()
    pids: list[int] = []

    @types.register("child", params=Empty, timeout=1)
    def child(ctx: JobContext, params: Empty) -> dict[str, Any]:
        proc = ctx.popen(["sleep", "3600"])
        pids.append(proc.pid)
        proc.wait()
        ctx.check()
        return {}

    running = run_worker(types, concurrency=1, grace=30)
    job_id = _submit(engine, running.worker.registry, org_id, "child", max_attempts=1)
    wait_for(lambda: pids, what="the child")
    assert _alive(pids[0])
    row = wait_for(lambda: _status(engine, job_id, "dead_letter"), what="the TIMEOUT")
    assert row.last_error_code == "TIMEOUT" and "stuck" not in row.last_error_message
    assert not _alive(pids[0])


def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period(
    run_worker: Any, engine: Engine, org_id: uuid.UUID, tmp_path: Path
) -> None:
    types = JobTypes()
    pid_file = tmp_path / "pid"
    script = f"echo $$ > {pid_file}; trap '' TERM; while :; do sleep 1; done"

    @types.register("stubborn", params=Empty, timeout=1)
    def stubborn(ctx: JobContext, params: Empty) -> dict[str, Any]:
        ctx.run_process(["sh", "-c", script])
        return {}

    running = run_worker(types, concurrency=1, grace=1)
    job_id = _submit(engine, running.worker.registry, org_id, "stubborn", max_attempts=1)
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), what="pid"))
    row = wait_for(lambda: _status(engine, job_id, "dead_letter"), what="the TIMEOUT")
    assert row.last_error_code == "TIMEOUT"
    assert not _alive(pid)
    # Its sleeps ignored SIGTERM too (inherited): the whole group got the SIGKILL.
    wait_for(lambda: not _group_alive(pid), what="the child's process group to go")


def test_a_worker_whose_slots_are_all_stuck_exits_non_zero(
    run_worker: Any, engine: Engine, org_id: uuid.UUID
) -> None:
    types = JobTypes()
    release = threading.Event()

    @types.register("sleeper", params=Empty, timeout=1)
    def sleeper(ctx: JobContext, params: Empty) -> dict[str, Any]:
        release.wait(120)
        return {}

    running = run_worker(types, concurrency=2)
    for _ in range(2):
        _submit(engine, running.worker.registry, org_id, "sleeper", max_attempts=1)
    try:
        running.thread.join(timeout=60)
        assert running.code == [EXIT_ALL_STUCK]
    finally:
        release.set()
    wait_for(lambda: running.metric("heimdex_worker_stuck_jobs") == 0, what="the threads back")


def test_a_submission_may_lower_the_types_timeout_never_raise_it(
    settings: Settings, engine: Engine, org_id: uuid.UUID
) -> None:
    app = create_app(settings.model_copy(update={"job_modules": TYPES}))
    with TestClient(app) as client:
        over = client.post(
            "/jobs", json={"type": "capped", "timeout_seconds": 61}, headers=auth(org_id)
        )
        assert over.status_code == 422, over.text
        assert over.json()["type"].endswith("timeout-above-type")
        assert "60 s timeout" in over.json()["detail"]
        batch = client.post(
            "/jobs/batch",
            json={"jobs": [{"type": "capped"}, {"type": "capped", "timeout_seconds": 3600}]},
            headers=auth(org_id),
        )
        assert batch.status_code == 422, batch.text
        assert "jobs[1]" in batch.json()["detail"]
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM job")).scalar() == 0
        ok = client.post(
            "/jobs", json={"type": "capped", "timeout_seconds": 30}, headers=auth(org_id)
        )
        assert ok.status_code == 201, ok.text
        assert ok.json()["timeout_seconds"] == 30


# Resumable jobs.


@pytest.fixture
def stage_runs(engine: Engine) -> Engine:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE stage_runs (key text, stage int)"))
    return engine


def _runs(engine: Engine, key: str) -> dict[int, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT stage, count(*) AS n FROM stage_runs WHERE key = :k GROUP BY stage"),
            {"k": key},
        ).all()
    return {r.stage: r.n for r in rows}


def _submit_resumable(engine: Engine, org: uuid.UUID, key: str, hold: Path | None) -> str:
    params = {"key": key, "hold_file": str(hold) if hold else ""}
    with engine.begin() as conn:
        row = conn.execute(
            text(
                "INSERT INTO job (org_id, type, params, max_attempts, backoff_policy)"
                " VALUES (:org, 'resumable', CAST(:params AS jsonb), 5, 'fixed') RETURNING id"
            ),
            {"org": org, "params": json.dumps(params)},
        ).one()
    return str(row.id)


@pytest.mark.slow  # worker processes, killed or signalled
@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_job_interrupted_in_stage_3_resumes_without_running_stages_1_and_2_again(
    kill: signal.Signals,
    processes: Processes,
    stage_runs: Engine,
    org_id: uuid.UUID,
    tmp_path: Path,
) -> None:
    engine = stage_runs
    env = {"HEIMDEX_JOB_MODULES": TYPES, "PYTHONPATH": str(REPO)}
    hold = tmp_path / "hold"
    hold.touch()
    job_id = _submit_resumable(engine, org_id, "interrupted", hold)
    first = processes.start("worker", env=env)
    wait_for(lambda: _runs(engine, "interrupted").get(3), what="stage 3 to start")
    os.kill(first.pid, kill)
    first.wait(timeout=30)
    row = _row(engine, job_id)
    assert row.checkpoint == {"stage": "stage2", "progress": 50, "state": {"done": 2, "total": 5}}
    if kill is signal.SIGTERM:
        assert (row.status, row.attempt) == ("queued", 0)  # released, not counted

    hold.unlink()
    whole_id = _submit_resumable(engine, org_id, "whole", None)
    processes.start("worker", env=env)
    done = wait_for(lambda: _status(engine, job_id, "succeeded"), what="the resumed attempt")
    whole = wait_for(lambda: _status(engine, whole_id, "succeeded"), what="the whole run")

    assert _runs(engine, "interrupted") == {1: 1, 2: 1, 3: 2, 4: 1}
    assert _runs(engine, "whole") == {1: 1, 2: 1, 3: 1, 4: 1}
    assert done.result == whole.result == {"total": 30}
    resumed = [e for e in _events(engine, job_id) if e.get("action") == "resumed"]
    assert [(e["skipped_through"], e["progress"]) for e in resumed] == [("stage2", 50)]
    assert not [e for e in _events(engine, whole_id) if e.get("action") == "resumed"]


def _dead_with_checkpoint(engine: Engine, org_id: uuid.UUID, saved: dict[str, Any]) -> uuid.UUID:
    with engine.begin() as conn:
        job_id: uuid.UUID = conn.execute(
            text(
                "INSERT INTO job (org_id, type, status, finished_at, checkpoint)"
                " VALUES (:org, 'resumable', 'dead_letter', now(), CAST(:cp AS jsonb))"
                " RETURNING id"
            ),
            {"org": org_id, "cp": json.dumps(saved)},
        ).scalar_one()
    return job_id


SAVED = {"stage": "stage2", "progress": 50, "state": {"done": 2}}


def _checkpoint(engine: Engine, job_id: uuid.UUID) -> Any:
    return _row(engine, str(job_id)).checkpoint


def test_an_operator_retry_resumes_unless_from_scratch(engine: Engine, org_id: uuid.UUID) -> None:
    kept, fresh = (_dead_with_checkpoint(engine, org_id, SAVED) for _ in range(2))
    operator = operations.Operator("ops", "upstream fixed")
    with engine.begin() as conn:
        operations.retry(conn, kept, operator)
        operations.retry(conn, fresh, operator, from_scratch=True)
    assert (_row(engine, str(kept)).status, _checkpoint(engine, kept)) == ("queued", SAVED)
    assert (_row(engine, str(fresh)).status, _checkpoint(engine, fresh)) == ("queued", None)
    retried = _events(engine, str(fresh))[-1]
    assert (retried["action"], retried["from_scratch"]) == ("retried", True)
    with engine.begin() as conn, pytest.raises(LedgerError, match="applies to a retry"):
        operations.operate(conn, operations.Action.REQUEUE, kept, operator, from_scratch=True)


def test_heimdex_jobs_retry_from_scratch_and_the_ops_api(
    db_url: URL,
    engine: Engine,
    org_id: uuid.UUID,
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", db_url.render_as_string(hide_password=False))
    by_cli, by_bulk_cli, by_api, by_bulk_api = (
        _dead_with_checkpoint(engine, org_id, SAVED) for _ in range(4)
    )
    runner = CliRunner()
    one = runner.invoke(
        main, ["jobs", "retry", str(by_cli), "--reason", "bad output", "--from-scratch"]
    )
    assert one.exit_code == 0, one.output
    many = runner.invoke(  # without --from-scratch: both keep their checkpoints
        main, ["jobs", "retry", str(by_bulk_cli), str(by_api), "--reason", "r", "--yes"]
    )
    assert many.exit_code == 0, many.output
    assert _checkpoint(engine, by_cli) is None
    assert _checkpoint(engine, by_bulk_cli) == _checkpoint(engine, by_api) == SAVED
    token = issue_token(SECRET, org_id=org_id, sub="op", role=ADMIN_ROLE)
    admin = {"Authorization": f"Bearer {token}"}
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE job SET status = 'dead_letter', finished_at = now() WHERE id = ANY(:ids)"),
            {"ids": [by_api, by_bulk_cli]},
        )
    resp = client.post(
        f"/ops/jobs/{by_api}/retry", json={"reason": "r", "from_scratch": True}, headers=admin
    )
    assert resp.status_code == 200, resp.text
    bulk = client.post(
        "/ops/bulk/retry",
        json={"filter": {"ids": [str(by_bulk_api)]}, "reason": "r", "from_scratch": True},
        headers=admin,
    )
    assert bulk.status_code == 200, bulk.text
    assert _checkpoint(engine, by_api) is None and _checkpoint(engine, by_bulk_api) is None
    assert _checkpoint(engine, by_bulk_cli) == SAVED


def test_a_checkpoint_too_large_fails_the_job_and_saves_nothing(
    run_worker: Any, engine: Engine, org_id: uuid.UUID
) -> None:
    types = JobTypes()

    @types.register("hoarder", params=Empty)
    def hoarder(ctx: JobContext, params: Empty) -> dict[str, Any]:
        ctx.checkpoint("everything", 50, {"blob": "x" * 100_000})
        return {}

    running = run_worker(types)
    job_id = _submit(engine, running.worker.registry, org_id, "hoarder")
    row = wait_for(lambda: _status(engine, job_id, "failed"), what="the failure")
    assert (row.last_error_code, row.checkpoint) == ("CHECKPOINT_TOO_LARGE", None)


def test_a_child_process_is_run_to_its_end_through_the_context(
    run_worker: Any, engine: Engine, org_id: uuid.UUID
) -> None:
    types = JobTypes()

    @types.register("echo", params=Empty, timeout=60)
    def echo(ctx: JobContext, params: Empty) -> dict[str, Any]:
        done = ctx.run_process(["echo", "hello"], stdout=subprocess.PIPE, text=True)
        return {"out": done.stdout.strip()}

    running = run_worker(types)
    job_id = _submit(engine, running.worker.registry, org_id, "echo")
    row = wait_for(lambda: _status(engine, job_id, "succeeded"), what="success")
    assert row.result == {"out": "hello"}
