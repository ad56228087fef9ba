"""Periodic schedules against the wall clock: three `heimdex worker` processes and an every-minute
schedule (declared by a type, and one added per org) give exactly one job per minute; all three
stopped for three minutes and started again, each schedule fires once for what it missed (the
latest fire time that passed, docs/architecture.md "Catch-up policy"), then one per minute again.
One of the three workers' sessions reads time in another zone (PGTZ): fire times stay UTC.

It sleeps through real minutes (about ten), so it runs only when asked for:
`uv run pytest -n 0 -s -m wallclock tests/worker/test_schedules_wallclock.py`.
The phases start a few seconds into a minute, so that starting and stopping the workers never
straddles a fire time and each expected fire time is exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from heimdex.ledger import schedules
from tests.stack import Processes, wait_for
from tests.worker.schedule_types import SCHEDULE_ORG

pytestmark = [pytest.mark.wallclock, pytest.mark.slow]

TYPES = "tests.worker.schedule_types:jobs"
REPO = Path(__file__).resolve().parents[2]
MINUTE = timedelta(minutes=1)
WORKERS = 3
OTHER_ZONE = "Asia/Kolkata"  # +05:30
DOWNTIME = timedelta(minutes=3)
# The per-org schedule, added through `heimdex schedules add`.
ORG = uuid.UUID("5c4ed01e-0000-4000-8000-0000000000a1")
ORG_SCHEDULE = "each-minute"
# (org, schedule name) of both schedules under test.
SCHEDULES = [(SCHEDULE_ORG, "minutely"), (ORG, ORG_SCHEDULE)]


@dataclass(frozen=True)
class Fire:
    org_id: uuid.UUID
    schedule: str
    key: str
    fire_at: datetime
    created_at: datetime
    job_id: uuid.UUID
    status: str


def _now(engine: Engine) -> datetime:
    """The database's clock: the one the keepers fire by."""
    with engine.connect() as conn:
        now: datetime = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
    return now


def _floor(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def _sleep_until(engine: Engine, at: datetime) -> None:
    while (left := (at - _now(engine)).total_seconds()) > 0:
        time.sleep(min(left, 5.0))


def _into_minute(engine: Engine, second: int) -> datetime:
    """Sleep until `second` seconds past a minute; that minute."""
    now = _now(engine)
    minute = _floor(now) if now.second < second else _floor(now) + MINUTE
    _sleep_until(engine, minute + timedelta(seconds=second))
    return minute


def _fires(engine: Engine) -> list[Fire]:
    """Every job a schedule submitted, its fire time read back from its idempotency key (as an
    instant: two spellings of one fire time would be two fires here)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, org_id, idempotency_key, created_at, status::text AS status FROM job"
                " WHERE requested_by LIKE 'schedule:%' ORDER BY created_at"
            )
        ).all()
    fires = []
    for row in rows:
        prefix, name, when = row.idempotency_key.split(":", 2)
        assert prefix == "schedule", row.idempotency_key
        fires.append(
            Fire(
                row.org_id,
                name,
                row.idempotency_key,
                datetime.fromisoformat(when),
                row.created_at,
                row.id,
                row.status,
            )
        )
    return fires


def _fire_times(fires: list[Fire], org_id: uuid.UUID, name: str) -> list[datetime]:
    return sorted(f.fire_at for f in fires if (f.org_id, f.schedule) == (org_id, name))


def _next_fire_at(engine: Engine) -> dict[tuple[uuid.UUID, str], datetime]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT org_id, name, next_fire_at FROM job_schedule")).all()
    return {(r.org_id, r.name): r.next_fire_at for r in rows}


def _caught_up(engine: Engine) -> bool:
    """Both schedules exist and none is due: a keeper has fired what was due."""
    due = _next_fire_at(engine)
    now = _now(engine)
    return all(key in due and due[key] > now for key in SCHEDULES)


def _log_lines(processes: Processes, proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    lines = []
    for line in processes.log_of(proc).splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return lines


class Workers:
    """Three `heimdex worker` processes at a time, started together and SIGTERMed by PID."""

    def __init__(self, processes: Processes, engine: Engine) -> None:
        self.processes = processes
        self.engine = engine
        self.env = {"HEIMDEX_JOB_MODULES": TYPES, "PYTHONPATH": str(REPO)}
        self.up: list[subprocess.Popen[bytes]] = []
        self.signalled: datetime | None = None
        self.all: list[subprocess.Popen[bytes]] = []

    def start(self) -> datetime:
        """Start three workers; the moment before the first was spawned."""
        spawned = _now(self.engine)
        # One of them reads time in another zone: fire times stay UTC instants.
        zones = [{"PGTZ": OTHER_ZONE} if i == 1 else {} for i in range(WORKERS)]
        self.up = [self.processes.start("worker", env={**self.env, **z}) for z in zones]
        self.all += self.up
        wait_for(
            lambda: all(
                any(line.get("action") == "worker.started" for line in self.log(p)) for p in self.up
            ),
            what="three workers to start",
            timeout=120,
        )
        return spawned

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.up)

    def stop(self) -> datetime:
        """SIGTERM every worker by PID and wait for each to exit; the moment all had."""
        self.signalled = _now(self.engine)
        for proc in self.up:
            os.kill(proc.pid, signal.SIGTERM)
        codes = [proc.wait(timeout=60) for proc in self.up]
        assert codes == [0] * WORKERS, [self.processes.log_of(p)[-2000:] for p in self.up]
        self.up = []
        return _now(self.engine)

    def log(self, proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
        return _log_lines(self.processes, proc)

    def created(self) -> list[tuple[str, int]]:
        """(job id, index of the worker process) for each job a keeper logged it created."""
        return [
            (line["job_id"], index)
            for index, proc in enumerate(self.all)
            for line in self.log(proc)
            if line.get("action") == "schedule.fired" and line.get("job_created")
        ]


def _add_org_schedule(processes: Processes) -> None:
    args = [
        sys.executable, "-m", "heimdex", "schedules", "add", "--org", str(ORG), ORG_SCHEDULE,
        "--type", "minutely", "--cron", "* * * * *", "--params", '{"label": "per org"}',
    ]  # fmt: skip
    added = subprocess.run(
        args,
        env={**os.environ, **processes.env, "HEIMDEX_JOB_MODULES": TYPES, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert added.returncode == 0, added.stderr


def _table(fires: list[Fire], fired_by: dict[str, int], first: datetime, last: datetime) -> str:
    """Jobs per schedule per minute, how late each was created and which worker created it."""
    lines = [f"{'minute (UTC)':<17} {'schedule':<12} jobs  created after  by worker"]
    minute = first
    while minute <= last:
        for org_id, name in SCHEDULES:
            mine = [f for f in fires if (f.org_id, f.schedule, f.fire_at) == (org_id, name, minute)]
            late = ", ".join(f"{(f.created_at - f.fire_at).total_seconds():.2f}s" for f in mine)
            who = ", ".join(str(fired_by.get(str(f.job_id), "?")) for f in mine)
            lines.append(f"{minute:%Y-%m-%d %H:%M} {name:<12} {len(mine):>4}  {late:>13}  {who}")
        minute += MINUTE
    return "\n".join(lines)


def test_three_workers_one_job_per_minute_and_one_catch_up_after_three_minutes_down(
    engine: Engine, processes: Processes
) -> None:
    workers = Workers(processes, engine)

    # Up: from a few seconds into a minute until 20 s past the third minute after it.
    start_minute = _into_minute(engine, 5)
    _add_org_schedule(processes)
    workers.start()
    wait_for(lambda: _caught_up(engine), what="both schedules to exist", timeout=120)
    first = start_minute + MINUTE
    assert set(_next_fire_at(engine).values()) == {first}, _next_fire_at(engine)
    _sleep_until(engine, first + 2 * MINUTE + timedelta(seconds=20))
    assert workers.alive()
    wait_for(lambda: _caught_up(engine), what="the third minute's fire")
    stopped = workers.stop()
    signalled = workers.signalled

    up_before = [first + i * MINUTE for i in range(3)]
    fires = _fires(engine)
    for org_id, name in SCHEDULES:
        assert _fire_times(fires, org_id, name) == up_before, (name, fires)

    # Down for three minutes (a little more if that would restart them late in a minute, where
    # their start could straddle a fire time): the fire times between pass with no worker.
    restart_at = stopped + DOWNTIME
    if restart_at.second >= 40:
        restart_at = _floor(restart_at) + MINUTE + timedelta(seconds=5)
    _sleep_until(engine, restart_at)
    assert _fires(engine) == fires  # nothing fires while every worker is down
    spawned = workers.start()
    started = _now(engine)
    wait_for(lambda: _caught_up(engine), what="the schedules to catch up", timeout=120)
    caught = _now(engine)
    missed = [m for m in (up_before[-1] + i * MINUTE for i in range(1, 10)) if m <= spawned]
    assert len(missed) >= 3, (stopped, spawned, missed)  # 3 minutes down: 3 fire times passed
    after = sorted({f.fire_at for f in _fires(engine)} - set(up_before))
    assert after, "no catch-up job"
    # The catch-up: the latest fire time passed when a restarted keeper fired.
    catch_up = after[0]
    assert catch_up >= missed[-1], f"a job for {catch_up}, missed before {missed[-1]}: a burst"
    assert catch_up <= _floor(caught), (catch_up, caught)

    # Up again until 20 s past the second minute after the catch-up.
    _sleep_until(engine, catch_up + 2 * MINUTE + timedelta(seconds=20))
    assert workers.alive()
    wait_for(lambda: _caught_up(engine), what="the last minute's fire")
    wait_for(
        lambda: all(f.status == "succeeded" for f in _fires(engine)),
        what="every scheduled job to run",
    )
    workers.stop()

    fires = _fires(engine)
    table = _table(fires, dict(workers.created()), first, catch_up + 2 * MINUTE)
    clock = "%H:%M:%S.%f"
    timeline = (
        f"SIGTERM {signalled:{clock}}, all exited {stopped:{clock}}, restarted {spawned:{clock}}"
        f" (up {started:{clock}}), caught up {caught:{clock}}"
    )
    print(f"\n{table}\n{timeline}")  # noqa: T201 - the run's jobs per minute, shown with -s

    # Exactly one job per fire time: no duplicate instant, whatever its key's spelling.
    per_fire = Counter((f.org_id, f.schedule, f.fire_at) for f in fires)
    assert [k for k, n in per_fire.items() if n > 1] == []
    expected = up_before + [catch_up + i * MINUTE for i in range(3)]
    for org_id, name in SCHEDULES:
        # One job per minute while up; of the fire times missed while down, one job, for the
        # latest; then one per minute again: no burst.
        assert _fire_times(fires, org_id, name) == expected, (name, fires)
    for f in fires:
        # Each job made in the minute of its fire time: never early, never a minute late.
        assert _floor(f.created_at) == f.fire_at, f
        # One spelling of a fire time, in UTC, whichever worker's session fired it.
        assert f.key == schedules.idempotency_key(f.schedule, f.fire_at), f
        assert f.status == "succeeded", f
    for f in (f for f in fires if f.fire_at == catch_up):
        # The catch-up job was made by a restarted worker, late by the downtime's remainder.
        assert spawned <= f.created_at <= caught, (spawned, f, caught)
    assert not [f for f in fires if stopped < f.created_at < spawned]
    # Each job was created by one keeper, which said so once in its log.
    assert sorted(job for job, _ in workers.created()) == sorted(str(f.job_id) for f in fires)
