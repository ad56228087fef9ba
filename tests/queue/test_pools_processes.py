"""The pools' guarantees with real worker processes on real PostgreSQL: a `--queues gpu` worker
claims nothing else and a queue without a worker holds nobody; caps hold across 8 worker
processes of 4 threads, sampled every 10 ms, while other orgs' jobs flow; weights 1 and 3 give
shares of running time; a paused queue starts nothing and its resume wakes the workers (a
NOTIFY, not the poll); caps survive a PostgreSQL restart and a worker SIGKILLed mid-batch."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from heimdex.ledger import control, repository
from heimdex.ledger.repository import NewJob
from tests.queue.test_guarantees import OwnDatabase, own_db
from tests.stack import Processes, wait_for

pytestmark = pytest.mark.slow  # worker processes

__all__ = ["own_db"]

TYPES = {"HEIMDEX_JOB_MODULES": "tests.queue.pool_types:jobs"}
WHO = control.Who("tester", "test")


def _submit(engine: Engine, org: uuid.UUID, n: int, *, seconds: float = 0.05,
            queue: str = "default") -> set[uuid.UUID]:  # fmt: skip
    type_ = "gpu_work" if queue == "gpu" else "work"
    jobs = [NewJob(org, type_, {"seconds": seconds}, None, queue=queue) for _ in range(n)]
    with engine.begin() as conn:
        return {j.id for j in repository.insert_jobs(conn, jobs)}


def _statuses(engine: Engine, ids: set[uuid.UUID]) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT status::text FROM job WHERE id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": list(ids)},
        ).scalars()
        return Counter(rows)


def _succeeded(engine: Engine, ids: set[uuid.UUID]) -> Callable[[], bool]:
    return lambda: _statuses(engine, ids)["succeeded"] == len(ids)


def _slots(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT coalesce(sum(used), 0) FROM job_limit")).scalar_one())


class Sampler(threading.Thread):
    """Counts each org's running jobs every 10 ms: the most seen, and every sample."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.most = Counter[uuid.UUID]()
        self.samples: list[Counter[uuid.UUID]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with self.engine.connect() as conn:
                    while not self.stop.wait(0.01):
                        self._sample(conn)
            except DBAPIError:  # PostgreSQL restarting: sample again once it is back
                self.stop.wait(0.1)

    def _sample(self, conn: Connection) -> None:
        rows = conn.execute(
            text("SELECT org_id, count(*) FROM job WHERE status = 'running' GROUP BY 1")
        ).all()
        conn.rollback()
        sample = Counter({org: int(n) for org, n in rows})
        self.samples.append(sample)
        for org, n in sample.items():
            self.most[org] = max(self.most[org], n)


def test_a_gpu_worker_claims_only_gpu_jobs_and_an_unserved_queue_holds_nobody(
    engine: Engine, processes: Processes
) -> None:
    org = uuid.uuid4()
    processes.start("worker", "--queues", "default", env=TYPES)
    gpu = _submit(engine, org, 6, queue="gpu")
    cpu = _submit(engine, org, 6)
    wait_for(_succeeded(engine, cpu), what="the default queue's jobs, with no gpu worker")
    assert _statuses(engine, gpu) == {"queued": 6}
    gpu_worker = processes.start("worker", "--queues", "gpu", env=TYPES)
    wait_for(_succeeded(engine, gpu), what="the gpu queue's jobs")
    more_cpu = _submit(engine, org, 4)
    wait_for(_succeeded(engine, more_cpu), what="more default jobs")
    with engine.connect() as conn:
        by_worker = conn.execute(
            text("""
SELECT j.queue, e.detail_json->>'worker' AS worker FROM job_event AS e JOIN job AS j
    ON j.id = e.job_id
 WHERE e.detail_json->>'action' = 'claimed'""")
        ).all()
    gpu_pid = f":{gpu_worker.pid}"
    assert {q for q, w in by_worker if w.endswith(gpu_pid)} == {"gpu"}
    assert {w.endswith(gpu_pid) for q, w in by_worker if q == "gpu"} == {True}


def test_caps_hold_across_eight_worker_processes_while_other_orgs_flow(
    engine: Engine, processes: Processes
) -> None:
    capped = [uuid.uuid4() for _ in range(4)]
    free = uuid.uuid4()
    with engine.begin() as conn:
        for org in capped:
            control.set_limit(conn, WHO, org_id=org, max_running=2)
    ids: set[uuid.UUID] = set()
    for org in capped:
        ids |= _submit(engine, org, 25, seconds=0.05)
    ids |= _submit(engine, free, 100, seconds=0.05)
    sampler = Sampler(engine)
    sampler.start()
    env = {**TYPES, "HEIMDEX_WORKER_CONCURRENCY": "4"}
    for _ in range(8):
        processes.start("worker", env=env)
    wait_for(_succeeded(engine, ids), what="every job", timeout=180)
    sampler.stop.set()
    sampler.join()
    assert all(sampler.most[org] <= 2 for org in capped), sampler.most
    # The uncapped org was not held to the capped ones' slots: it ran more than 2 at once.
    assert sampler.most[free] > 2, sampler.most
    assert _slots(engine) == 0


def test_weights_one_and_three_share_a_saturated_pool(engine: Engine, processes: Processes) -> None:
    light, heavy = uuid.uuid4(), uuid.uuid4()
    with engine.begin() as conn:
        control.set_limit(conn, WHO, org_id=heavy, weight=3)
    light_ids = _submit(engine, light, 300, seconds=0.05)
    heavy_ids = _submit(engine, heavy, 300, seconds=0.05)
    sampler = Sampler(engine)
    sampler.start()
    env = {**TYPES, "HEIMDEX_WORKER_CONCURRENCY": "4", "HEIMDEX_CLAIM_BATCH": "1"}
    for _ in range(2):
        processes.start("worker", env=env)
    # Saturated while both have queued jobs: the heavy org's run out first.
    wait_for(lambda: _statuses(engine, heavy_ids)["queued"] == 0, what="the heavy backlog",
             timeout=180)  # fmt: skip
    sampler.stop.set()
    sampler.join()
    running = Counter[uuid.UUID]()
    for sample in sampler.samples:
        running.update(sample)
    share = running[heavy] / (running[heavy] + running[light])
    assert abs(share - 0.75) <= 0.075, (share, running)
    wait_for(_succeeded(engine, light_ids | heavy_ids), what="every job", timeout=180)


def test_a_paused_queue_starts_nothing_and_resume_wakes_the_workers(
    engine: Engine, processes: Processes
) -> None:
    org = uuid.uuid4()
    # The poll is a minute away: only the NOTIFY of the resume can start the jobs in time.
    env = {**TYPES, "HEIMDEX_POLL_INTERVAL_SECONDS": "60"}
    with engine.begin() as conn:
        control.pause(conn, WHO, kind="queue", value="gpu")
    worker = processes.start("worker", env=env)
    wait_for(lambda: "worker started" in processes.log_of(worker), what="the worker")
    gpu = _submit(engine, org, 4, queue="gpu")
    cpu = _submit(engine, org, 4)
    wait_for(_succeeded(engine, cpu), what="the jobs not paused")
    assert _statuses(engine, gpu) == {"queued": 4}
    with engine.begin() as conn:
        control.resume(conn, WHO, kind="queue", value="gpu")
    wait_for(_succeeded(engine, gpu), what="the resumed jobs, before the poll", timeout=30)


def test_caps_survive_a_postgres_restart_and_a_worker_killed_mid_batch(
    own_db: OwnDatabase, processes: Processes
) -> None:
    engine = own_db.engine
    orgs = [uuid.uuid4() for _ in range(3)]
    with engine.begin() as conn:
        for org in orgs:
            control.set_limit(conn, WHO, org_id=org, max_running=2)
    ids: set[uuid.UUID] = set()
    for org in orgs:
        ids |= _submit(engine, org, 12, seconds=0.3)
    env = {**own_db.env, **TYPES, "HEIMDEX_WORKER_CONCURRENCY": "3",
           "HEIMDEX_LIMITS_RECONCILE_SECONDS": "1"}  # fmt: skip
    sampler = Sampler(engine)
    sampler.start()
    victim = processes.start("worker", env=env)
    processes.start("worker", env=env)
    wait_for(lambda: _statuses(engine, ids)["running"] >= 3, what="jobs running")
    victim.kill()  # SIGKILL, by its pid: its leases expire, its slots with them
    victim.wait()
    own_db.pg.stop()
    own_db.pg.start()
    engine.dispose()
    wait_for(_succeeded(engine, ids), what="every accepted job", timeout=180)
    wait_for(lambda: _slots(engine) == 0, what="every slot back")
    sampler.stop.set()
    sampler.join()
    assert all(sampler.most[org] <= 2 for org in orgs), sampler.most
