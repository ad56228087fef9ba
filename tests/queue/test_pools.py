"""Queues, caps, weights and pauses in the ledger's own statements, on real PostgreSQL: a claim
takes only its queues; no interleaving of placers and claimers in threads exceeds a cap; a
capped-out backlog stays out of the placer's way; weights give shares; a pause holds, a resume
wakes the workers (NOTIFY); slots come back with outcomes, cancels and the recount."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL

from heimdex.ledger import control, repository
from heimdex.ledger.repository import NewJob, Outcome
from heimdex.models import JobStatus

WHO = control.Who("tester", "test")


def _submit(conn: Connection, org: uuid.UUID, n: int, *, queue: str = "default",
            type: str = "noop") -> list[uuid.UUID]:  # fmt: skip
    jobs = [
        NewJob(org_id=org, type=type, params={}, request_fingerprint=None, queue=queue)
        for _ in range(n)
    ]
    return [r.id for r in repository.insert_jobs(conn, jobs)]


def _auto(engine: Engine) -> Connection:
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def _claim(
    conn: Connection, limit: int = 10, queues: tuple[str, ...] = ("default",)
) -> repository.Claim:
    return repository.claim(conn, worker_id="w", limit=limit, lease_seconds=60, queues=queues)


def _done(conn: Connection, jobs: list[repository.ClaimedJob]) -> None:
    repository.write_outcomes(
        conn,
        [Outcome(j.id, j.lease_token, JobStatus.SUCCEEDED, j.attempt, {"action": "ok"})
         for j in jobs],
    )  # fmt: skip


def _drain_placing(conn: Connection) -> int:
    placed = 0
    while n := repository.place_due(conn):
        placed += n
    return placed


@pytest.fixture
def auto(engine: Engine) -> Iterator[Connection]:
    with _auto(engine) as conn:
        yield conn


def test_a_claim_takes_only_its_queues_and_an_unserved_queue_holds_nobody(
    auto: Connection,
) -> None:
    org = uuid.uuid4()
    gpu = set(_submit(auto, org, 5, queue="gpu"))
    cpu = set(_submit(auto, org, 5))
    other = set(_submit(auto, org, 3, queue="index"))  # no worker serves it
    taken = _claim(auto, limit=20, queues=("gpu",))
    assert {j.id for j in taken.jobs} == gpu
    # The default queue's claims are not held back by the unserved queue's older jobs.
    assert {j.id for j in _claim(auto, limit=20).jobs} == cpu
    assert not _claim(auto, limit=20, queues=("default", "gpu")).jobs
    two = _claim(auto, limit=2, queues=("gpu", "index"))  # a merged claim, in claim order
    assert len(two.jobs) == 2 and {j.id for j in two.jobs} <= other
    rows = auto.execute(text("SELECT id, queue FROM job WHERE status = 'running'")).all()
    assert {r.queue for r in rows if r.id in gpu} == {"gpu"}


def test_a_capped_scope_goes_through_the_placer_and_holds_its_backlog(
    auto: Connection,
) -> None:
    capped, free = uuid.uuid4(), uuid.uuid4()
    control.set_limit(auto, WHO, org_id=capped, max_running=2)
    backlog = _submit(auto, capped, 300)
    others = _submit(auto, free, 3)
    # The capped org's jobs wait for the placer; the other org's are placed by their submit.
    first = _claim(auto, limit=10)
    assert {j.id for j in first.jobs} == set(others) and first.more_due
    assert _drain_placing(auto) == 2
    held = auto.execute(text("SELECT count(*) FROM job WHERE held")).scalar_one()
    assert held == 298
    # Held jobs are out of the placer's index: nothing left to place, nothing to look at.
    assert repository.place_due(auto) == 0
    taken = _claim(auto, limit=10)
    assert len(taken.jobs) == 2 and not taken.more_due
    assert {j.org_id for j in taken.jobs} == {capped}
    # An outcome gives its slot back: the next claim says so, the placer lets one more in.
    _done(auto, taken.jobs[:1])
    again = _claim(auto, limit=10)
    assert not again.jobs and again.more_due
    assert _drain_placing(auto) == 1
    assert len(_claim(auto, limit=10).jobs) == 1
    limit = repository.limits.get_limit(auto, org_id=capped, queue=None)
    assert limit is not None and limit.used == 2 and limit.waiting
    assert set(backlog) >= {r.id for r in auto.execute(text("SELECT id FROM job WHERE held"))}


def test_caps_per_org_in_a_queue_and_per_queue(auto: Connection) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    control.set_limit(auto, WHO, org_id=a, queue="gpu", max_running=1)
    control.set_limit(auto, WHO, org_id=None, queue="gpu", max_running=3)
    _submit(auto, a, 5, queue="gpu")
    _submit(auto, b, 5, queue="gpu")
    _submit(auto, a, 4)  # a's default queue is not capped: placed by its submit
    _drain_placing(auto)
    gpu = _claim(auto, limit=20, queues=("gpu",)).jobs
    assert Counter(j.org_id for j in gpu) == {a: 1, b: 2}
    assert len(_claim(auto, limit=20).jobs) == 4


def _sample(engine: Engine, stop: threading.Event, seen: Counter[uuid.UUID],
            flowing: list[int]) -> None:  # fmt: skip
    with _auto(engine) as conn:
        while not stop.is_set():
            rows = conn.execute(
                text("SELECT org_id, count(*) FROM job WHERE status = 'running' GROUP BY 1")
            ).all()
            for org, n in rows:
                seen[org] = max(seen[org], n)
            flowing.append(
                conn.execute(text("SELECT count(*) FROM job WHERE status = 'succeeded'"))
                .scalar_one()
            )  # fmt: skip
            time.sleep(0.002)


def test_no_interleaving_of_placers_and_claimers_exceeds_a_cap(engine: Engine) -> None:
    capped = [uuid.uuid4() for _ in range(3)]
    free = uuid.uuid4()
    with _auto(engine) as conn:
        for org in capped:
            control.set_limit(conn, WHO, org_id=org, max_running=2)
        for org in capped:
            _submit(conn, org, 40)
        _submit(conn, free, 60)
    total = 180
    stop, seen, flowing = threading.Event(), Counter[uuid.UUID](), list[int]()
    sampler = threading.Thread(target=_sample, args=(engine, stop, seen, flowing))
    sampler.start()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with _auto(engine) as conn:
                while conn.execute(
                    text("SELECT count(*) FROM job WHERE status <> 'succeeded'")
                ).scalar_one():
                    claim = _claim(conn, limit=3)
                    if claim.more_due:
                        repository.place_due(conn)
                    time.sleep(0.003)  # the jobs run
                    _done(conn, claim.jobs)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sampler.join()
    assert not errors, errors
    assert all(seen[org] <= 2 for org in capped), seen
    assert seen[free] > 2  # the uncapped org was not held to the others' caps
    with engine.connect() as conn:
        assert (
            conn.execute(text("SELECT count(*) FROM job WHERE status = 'succeeded'")).scalar_one()
            == total
        )
        # Every slot came back.
        assert conn.execute(text("SELECT sum(used) FROM job_limit")).scalar_one() == 0
    # The uncapped org's jobs went on while the capped ones waited for their slots.
    assert flowing[-1] == total


def test_weights_give_shares_of_the_starts(auto: Connection) -> None:
    light, heavy = uuid.uuid4(), uuid.uuid4()
    control.set_limit(auto, WHO, org_id=heavy, weight=3)
    _submit(auto, light, 400)
    _submit(auto, heavy, 400)
    starts = Counter[uuid.UUID]()
    for _ in range(40):  # a saturated pool: 400 starts, equal-length jobs
        claim = _claim(auto, limit=10)
        starts.update(j.org_id for j in claim.jobs)
        _done(auto, claim.jobs)
    share = starts[heavy] / (starts[heavy] + starts[light])
    assert abs(share - 0.75) <= 0.075, starts


def test_a_newcomer_waits_at_most_a_job_per_other_org_unit_of_weight(auto: Connection) -> None:
    orgs = [uuid.uuid4() for _ in range(5)]
    for org in orgs:
        _submit(auto, org, 50)
    _done(auto, _claim(auto, limit=20).jobs)
    newcomer = uuid.uuid4()
    (job,) = _submit(auto, newcomer, 1)
    ahead = 0
    while True:
        (claimed,) = _claim(auto, limit=1).jobs
        if claimed.id == job:
            break
        ahead += 1
    assert ahead <= len(orgs)


def _listen(db_url: URL) -> psycopg.Connection[tuple[object, ...]]:
    conn = psycopg.connect(db_url.set(drivername="postgresql").render_as_string(False),
                           autocommit=True)  # fmt: skip
    conn.execute(f"LISTEN {repository.NOTIFY_CHANNEL}")
    return conn


@pytest.mark.parametrize("kind", ["queue", "type", "org"])
def test_nothing_paused_starts_and_resume_wakes_the_workers(
    engine: Engine, db_url: URL, kind: str
) -> None:
    org, other = uuid.uuid4(), uuid.uuid4()
    value = {"queue": "gpu", "type": "transcode", "org": str(org)}[kind]
    with _auto(engine) as conn:
        placed = _submit(conn, org, 3, queue="gpu", type="transcode")
        control.pause(conn, WHO, kind=kind, value=value)
        later = _submit(conn, org, 2, queue="gpu", type="transcode")
        _submit(conn, other, 2)  # not paused
        _drain_placing(conn)
        taken = _claim(conn, limit=50, queues=("default", "gpu"))
        assert {j.org_id for j in taken.jobs} == {other}
        held = set(conn.execute(text("SELECT id FROM job WHERE held")).scalars())
        assert held == set(placed) | set(later)
        listener = _listen(db_url)
        try:
            control.resume(conn, WHO, kind=kind, value=value)
            # The workers hear it at once: a NOTIFY, not their poll.
            assert next(listener.notifies(timeout=5, stop_after=1), None) is not None
        finally:
            listener.close()
        _drain_placing(conn)
        back = _claim(conn, limit=50, queues=("default", "gpu"))
        assert {j.id for j in back.jobs} == set(placed) | set(later)
        events = conn.execute(
            text("SELECT action, actor, reason FROM job_control_event ORDER BY ts")
        ).all()
        assert [tuple(e) for e in events] == [
            ("paused", "tester", "test"),
            ("resumed", "tester", "test"),
        ]


def test_a_pause_gives_back_the_slots_of_the_jobs_it_unplaces(auto: Connection) -> None:
    org = uuid.uuid4()
    control.set_limit(auto, WHO, org_id=org, max_running=3)
    _submit(auto, org, 5)
    _drain_placing(auto)
    limit = repository.limits.get_limit(auto, org_id=org, queue=None)
    assert limit is not None and limit.used == 3
    control.pause(auto, WHO, kind="org", value=str(org))
    limit = repository.limits.get_limit(auto, org_id=org, queue=None)
    assert limit is not None and limit.used == 0
    control.resume(auto, WHO, kind="org", value=str(org))
    _drain_placing(auto)
    assert len(_claim(auto, limit=10).jobs) == 3


def test_a_cancel_gives_back_a_placed_jobs_slot_and_the_recount_heals(
    auto: Connection, engine: Engine
) -> None:
    org = uuid.uuid4()
    control.set_limit(auto, WHO, org_id=org, max_running=2)
    ids = _submit(auto, org, 4)
    _drain_placing(auto)
    placed = (
        auto.execute(text("SELECT id FROM job WHERE turn IS NOT NULL ORDER BY turn"))
        .scalars()
        .all()
    )
    repository.cancel_queued(auto, placed[0], {"action": "canceled"})
    limit = repository.limits.get_limit(auto, org_id=org, queue=None)
    assert limit is not None and limit.used == 1
    assert _drain_placing(auto) == 1
    # A count left wrong heals at the keeper's recount.
    auto.execute(text("UPDATE job_limit SET used = 0, waiting = false"))
    with engine.begin() as conn:
        control.lock_placer(conn)
        assert control.reconcile(conn) == 1
    limit = repository.limits.get_limit(auto, org_id=org, queue=None)
    assert limit is not None and limit.used == 2 and limit.waiting
    assert len(ids) == 4


def test_bad_input_changes_nothing(auto: Connection) -> None:
    org = uuid.uuid4()
    with pytest.raises(control.InvalidControl, match="max-running"):
        control.set_limit(auto, WHO, org_id=org, max_running=-1)
    with pytest.raises(control.InvalidControl, match="weight"):
        control.set_limit(auto, WHO, org_id=org, weight=0)
    with pytest.raises(control.InvalidControl, match="an org"):
        control.set_limit(auto, WHO, org_id=None, max_running=2)
    with pytest.raises(control.InvalidControl, match="reason"):
        control.set_limit(auto, control.Who("me", " "), org_id=org, max_running=2)
    with pytest.raises(control.ControlNotFound):
        control.unset_limit(auto, WHO, org_id=org)
    with pytest.raises(control.InvalidControl, match="UUID"):
        control.pause(auto, WHO, kind="org", value="acme")
    with pytest.raises(control.ControlNotFound):
        control.resume(auto, WHO, kind="queue", value="gpu")
    for table in ("job_limit", "job_pause", "job_control_event"):
        assert auto.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == 0
