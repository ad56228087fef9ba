"""Periodic schedules on real PostgreSQL: each fire time is one job whatever the workers do,
and missed fire times are caught up by one job."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import BaseModel
from sqlalchemy import Engine, text

from heimdex.errors import HeimdexError
from heimdex.ledger import schedules
from heimdex.ledger.registry import JobTypes, Registry
from heimdex.settings import Settings
from tests.stack import ThreadWorkers, wait_for
from tests.worker.schedule_types import SCHEDULE_ORG, jobs

TYPES = "tests.worker.schedule_types:jobs"
BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def registry() -> Registry:
    return Registry([(TYPES, jobs)])


def _scheduled_jobs(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT id, idempotency_key, params, status, requested_by FROM job"
                    " WHERE org_id = :org AND type = 'minutely' ORDER BY idempotency_key"
                ),
                {"org": SCHEDULE_ORG},
            )
        )


def _schedule(engine: Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT * FROM job_schedule WHERE org_id = :org AND name = 'minutely'"),
            {"org": SCHEDULE_ORG},
        ).one()


def _fire_together(engine: Engine, registry: Registry, now: datetime, tickers: int = 3) -> int:
    """`tickers` threads fire due schedules at the same moment, each in its own transaction;
    the number of jobs they created."""
    barrier = threading.Barrier(tickers)
    created: list[int] = []
    errors: list[BaseException] = []

    def tick() -> None:
        try:
            barrier.wait()
            with engine.begin() as conn:
                fired = schedules.fire_due(conn, registry, now=now)
            created.append(sum(f.created for f in fired))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=tick) for _ in range(tickers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return sum(created)


def test_a_bad_schedule_is_refused_where_the_type_is_declared() -> None:
    types = JobTypes()
    with pytest.raises(HeimdexError, match="not a cron expression"):
        types.declare("bad", params=BaseModel, schedule="every minute")

    class Needs(BaseModel):
        asset_id: str

    with pytest.raises(HeimdexError, match="schedule_params"):
        types.declare("needs", params=Needs, schedule="* * * * *")


def test_three_tickers_make_exactly_one_job_per_minute(engine: Engine, registry: Registry) -> None:
    with engine.begin() as conn:
        schedules.sync_declared(conn, schedules.declared_schedules(registry), now=BASE)
    assert _schedule(engine).next_fire_at == BASE + timedelta(minutes=1)
    assert _fire_together(engine, registry, BASE + timedelta(seconds=30)) == 0
    for minute in range(1, 6):
        # Seconds into the minute, and again later in it: still the one job of that minute.
        assert _fire_together(engine, registry, BASE + timedelta(minutes=minute, seconds=1)) == 1
        assert _fire_together(engine, registry, BASE + timedelta(minutes=minute, seconds=50)) == 0
    rows = _scheduled_jobs(engine)
    assert [r.idempotency_key for r in rows] == [
        f"schedule:minutely:{(BASE + timedelta(minutes=m)).isoformat()}" for m in range(1, 6)
    ]
    assert {r.params["label"] for r in rows} == {"every minute"}
    assert {r.requested_by for r in rows} == {"schedule:minutely"}
    schedule = _schedule(engine)
    assert schedule.next_fire_at == BASE + timedelta(minutes=6)
    assert schedule.last_fire_at == BASE + timedelta(minutes=5)
    assert schedule.last_job_id == rows[-1].id


def test_a_fire_time_fired_again_is_still_one_job(engine: Engine, registry: Registry) -> None:
    """The row lock aside, the idempotency key alone keeps a fire time one job (a ticker
    that read the row before another moved it on)."""
    with engine.begin() as conn:
        schedules.sync_declared(conn, schedules.declared_schedules(registry), now=BASE)
    at = BASE + timedelta(minutes=1, seconds=5)
    assert _fire_together(engine, registry, at, tickers=1) == 1
    with engine.begin() as conn:
        conn.execute(text("UPDATE job_schedule SET next_fire_at = :t"), {"t": BASE})
    assert _fire_together(engine, registry, at, tickers=3) == 0
    assert len(_scheduled_jobs(engine)) == 1


def test_after_downtime_a_schedule_fires_once_for_what_it_missed(
    engine: Engine, registry: Registry
) -> None:
    with engine.begin() as conn:
        schedules.sync_declared(conn, schedules.declared_schedules(registry), now=BASE)
    assert _fire_together(engine, registry, BASE + timedelta(minutes=1, seconds=1)) == 1
    # Every worker down for an hour: 60 fire times missed, one job for them.
    back = BASE + timedelta(hours=1, minutes=1, seconds=20)
    assert _fire_together(engine, registry, back) == 1
    rows = _scheduled_jobs(engine)
    assert len(rows) == 2
    assert rows[-1].idempotency_key == (
        f"schedule:minutely:{(BASE + timedelta(hours=1, minutes=1)).isoformat()}"
    )
    assert _schedule(engine).next_fire_at == BASE + timedelta(hours=1, minutes=2)


def test_a_paused_schedule_does_not_fire_and_a_redeclared_one_keeps_its_state(
    engine: Engine, registry: Registry
) -> None:
    with engine.begin() as conn:
        schedules.sync_declared(conn, schedules.declared_schedules(registry), now=BASE)
        conn.execute(text("UPDATE job_schedule SET paused = true"))
        # A worker starting later leaves the row as it is.
        schedules.sync_declared(
            conn, schedules.declared_schedules(registry), now=BASE + timedelta(hours=1)
        )
    assert _schedule(engine).paused
    assert _schedule(engine).next_fire_at == BASE + timedelta(minutes=1)
    assert _fire_together(engine, registry, BASE + timedelta(minutes=5)) == 0
    assert _scheduled_jobs(engine) == []


def test_three_workers_fire_missed_time_once_then_again_after_a_restart(
    engine: Engine, settings: Settings, thread_workers: ThreadWorkers
) -> None:
    """Real workers (threads running `run_worker`): their keepers sync the declared schedule
    and fire it; a schedule left due by downtime gives one job, run by one of them."""
    typed = settings.model_copy(update={"job_modules": TYPES})

    def due_an_hour_ago() -> None:
        with engine.begin() as conn:
            conn.execute(text("UPDATE job_schedule SET next_fire_at = now() - interval '1 hour'"))

    def succeeded(n: int) -> bool:
        return [r.status for r in _scheduled_jobs(engine)].count("succeeded") >= n

    def caught_up() -> bool:
        with engine.connect() as conn:
            return bool(
                conn.execute(
                    text("SELECT bool_and(next_fire_at > now()) FROM job_schedule")
                ).scalar()
            )

    for _ in range(3):
        thread_workers.start(typed)
    wait_for(lambda: _schedule_or_none(engine), what="the workers to declare the schedule")
    due_an_hour_ago()
    wait_for(lambda: succeeded(1), what="the missed fire time's job to run")
    thread_workers.stop_all()
    thread_workers.running.clear()
    due_an_hour_ago()  # down again: the same latest missed fire time, unless a minute passed
    for _ in range(3):
        thread_workers.start(typed)
    wait_for(caught_up, what="the workers to fire the schedule again")
    wait_for(
        lambda: all(r.status == "succeeded" for r in _scheduled_jobs(engine)),
        what="the schedule's jobs to run",
    )
    thread_workers.stop_all()
    rows = _scheduled_jobs(engine)
    # One job per fire time: the latest one each downtime missed (the same one when both
    # catch-ups fell in one minute) and any minute boundary passed meanwhile; never the 60
    # fire times an hour down missed.
    assert 1 <= len(rows) <= 3
    keys = [r.idempotency_key for r in rows]
    assert len(set(keys)) == len(keys)
    assert _schedule(engine).last_job_id == rows[-1].id


def _schedule_or_none(engine: Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(text("SELECT 1 FROM job_schedule")).first()


def test_an_org_schedule_fires_for_its_org_and_resuming_skips_what_it_missed(
    engine: Engine, registry: Registry
) -> None:
    org = uuid.uuid4()
    with engine.begin() as conn:
        schedules.add_schedule(
            conn, registry, org_id=org, name="five", type="minutely", cron="*/5 * * * *",
            params={"label": "x"}, now=BASE,
        )  # fmt: skip
    assert _fire_together(engine, registry, BASE + timedelta(minutes=5, seconds=1)) == 1
    with engine.begin() as conn:
        (listed,) = schedules.list_schedules(conn, org)
        assert listed.last_job_status == "queued"
        assert listed.last_fire_at == BASE + timedelta(minutes=5)
        key = conn.execute(
            text("SELECT idempotency_key FROM job WHERE org_id = :org"), {"org": org}
        ).scalar_one()
        assert key == f"schedule:five:{(BASE + timedelta(minutes=5)).isoformat()}"
        schedules.set_paused(conn, org, "five", paused=True)
    assert _fire_together(engine, registry, BASE + timedelta(minutes=30)) == 0
    with engine.begin() as conn:
        resumed = schedules.set_paused(
            conn, org, "five", paused=False, now=BASE + timedelta(minutes=31)
        )
    assert resumed.next_fire_at == BASE + timedelta(minutes=35)
    assert _fire_together(engine, registry, BASE + timedelta(minutes=31)) == 0
    assert _fire_together(engine, registry, BASE + timedelta(minutes=35)) == 1


def test_fire_times_are_utc_whatever_the_sessions_time_zone(
    engine: Engine, registry: Registry
) -> None:
    """A session's TimeZone (the server's default, `ALTER ROLE ... SET timezone`, a worker's
    PGTZ) changes how `now()` and the schedule's timestamps read, never which instants fire."""
    org = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL TIME ZONE 'Asia/Kolkata'"))
        schedules.add_schedule(
            conn, registry, org_id=org, name="nightly", type="minutely", cron="0 3 * * *",
            params={},
        )  # fmt: skip
        next_fire_at = schedules.get_schedule(conn, org, "nightly").next_fire_at
    at = next_fire_at.astimezone(UTC)
    assert (at.hour, at.minute) == (3, 0), next_fire_at  # 03:00 UTC, not 03:00 in Kolkata


def test_a_fire_time_is_one_job_whatever_the_sessions_time_zone(
    engine: Engine, registry: Registry
) -> None:
    """Two workers whose sessions read time in other zones fire the same instant: one key."""
    with engine.begin() as conn:
        schedules.sync_declared(conn, schedules.declared_schedules(registry), now=BASE)
    at = BASE + timedelta(minutes=1, seconds=5)
    with engine.begin() as conn:
        fired = schedules.fire_due(conn, registry, now=at)
    assert [f.created for f in fired] == [True]
    with engine.begin() as conn:
        conn.execute(text("UPDATE job_schedule SET next_fire_at = :t"), {"t": BASE})
    with engine.begin() as conn:  # a row read before the first worker moved it on
        conn.execute(text("SET LOCAL TIME ZONE 'America/New_York'"))
        fired = schedules.fire_due(conn, registry, now=at.astimezone(ZoneInfo("America/New_York")))
    assert [f.created for f in fired] == [False]
    (row,) = _scheduled_jobs(engine)
    assert row.idempotency_key == f"schedule:minutely:{(BASE + timedelta(minutes=1)).isoformat()}"
