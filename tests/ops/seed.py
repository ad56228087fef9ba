"""Jobs in the states an operator meets, made through the ledger's own functions."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Engine, text

from heimdex.ledger import control, repository, service
from heimdex.ledger.registry import JobTypes, Registry, load_registry

POLICY = service.RetryPolicy(base_seconds=60.0, max_seconds=60.0)
TIMEOUT = ("UPSTREAM_TIMEOUT", "no answer from 10.0.0.{n} after 30s (job {id})")


def queued(engine: Engine, org: uuid.UUID, n: int = 1, **spec: object) -> list[uuid.UUID]:
    specs = [
        service.JobSpec(**{"type": "noop", "params": {}, **spec})  # type: ignore[arg-type]
        for _ in range(n)
    ]
    with engine.begin() as conn:
        return [
            s.job.id for s in service.submit_jobs(conn, load_registry(), org_id=org, specs=specs)
        ]


def failed(
    engine: Engine,
    org: uuid.UUID,
    n: int = 1,
    *,
    code: str = TIMEOUT[0],
    message: str = TIMEOUT[1],
    retryable: bool = True,
    max_attempts: int = 1,
    type: str = "noop",
) -> list[uuid.UUID]:
    """`n` jobs whose one attempt failed with `code`: dead letters (or `failed` when not
    retryable). `message` may name `{n}` and `{id}`, which differ per job."""
    ids = set(queued(engine, org, n, max_attempts=max_attempts, type=type))
    with engine.begin() as conn:
        # Other tests' queued jobs may be claimed too; only ours fail, the rest are released.
        claimed = repository.claim(conn, worker_id="seed", limit=10_000, lease_seconds=60).jobs
        mine = [j for j in claimed if j.id in ids]
        others = [service.released(j) for j in claimed if j.id not in ids]
        repository.write_outcomes(conn, others)
        service.fail_attempts(
            conn,
            [
                service.Failure(j.id, j.lease_token, code, message.format(n=i, id=j.id), retryable)
                for i, j in enumerate(mine)
            ],
            policy=POLICY,
        )
    assert len(mine) == n
    return sorted(ids)


# Markup an attacker could place in job data; each must reach the page as text.
SCRIPT = "<script>alert(1)</script>"
IMG = "\"'><img src=x onerror=alert(1)>"
HOSTILE = SCRIPT + IMG


class _Note(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str


def hostile_registry() -> Registry:
    types = JobTypes()
    types.declare(HOSTILE, params=_Note)
    return Registry([("tests", types)])


def hostile(engine: Engine, org: uuid.UUID) -> dict[str, uuid.UUID]:
    """Jobs whose every free-text field carries markup, submitted and run through the ledger's
    own functions: a dead letter (failed at a stage), a running job, a queued one; and one
    more in a queue named with markup (no submit accepts that name: a row written by SQL) and
    its type paused by an operator named with markup, for a reason with markup."""
    registry = hostile_registry()
    specs = [
        service.JobSpec(
            type=HOSTILE, params={"note": HOSTILE}, idempotency_key=f"{HOSTILE}{i}", max_attempts=1
        )
        for i in range(3)
    ]
    with engine.begin() as conn:
        ids = [
            s.job.id
            for s in service.submit_jobs(conn, registry, org_id=org, specs=specs, requested_by=IMG)
        ]
    with engine.begin() as conn:
        claimed = repository.claim(conn, worker_id=HOSTILE, limit=10_000, lease_seconds=600).jobs
        mine = {j.id: j for j in claimed if j.id in ids[:2]}
        repository.write_outcomes(conn, [service.released(j) for j in claimed if j.id not in mine])
        for j in mine.values():
            repository.record_stage(conn, j.id, j.lease_token, stage=IMG, progress=40)
        dead = mine[ids[0]]
        service.fail_attempts(
            conn,
            [service.Failure(dead.id, dead.lease_token, HOSTILE, HOSTILE, True)],
            policy=POLICY,
        )
    with engine.begin() as conn:
        (odd,) = [
            s.job.id
            for s in service.submit_jobs(
                conn, load_registry(), org_id=org, specs=[service.JobSpec(type="noop", params={})]
            )
        ]
        conn.execute(
            text("UPDATE job SET queue = :q WHERE id = :id"), {"q": SCRIPT + "'\"", "id": odd}
        )
        control.pause(conn, control.Who(HOSTILE, HOSTILE), kind="type", value=HOSTILE)
    return {"dead": ids[0], "running": ids[1], "queued": ids[2], "queue": odd}
