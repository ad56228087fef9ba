"""The figures of the dashboard's Pools page: what runs and waits per queue and org, the running
time of the last hour, and the oldest waiting job of each queue and org. Reads only; each
statement states what it reads."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, text

FINISHED = ("succeeded", "failed", "canceled", "dead_letter")
# The most finished jobs the running-time statement reads per finished state: past this the
# window it covers shrinks to the newest jobs (`RunningTime.since` says from when).
RAN_ROWS = 10_000


@dataclass(frozen=True)
class Load:
    """Unfinished jobs of an org in a queue: running, and queued and due (held: of those, set
    aside by the placer for a full cap or a pause)."""

    queue: str
    org_id: uuid.UUID
    running: int
    waiting: int
    held: int


def loads(conn: Connection) -> list[Load]:
    """Per queue and org. Reads only the unfinished rows (like `stats.queue_stats`): its cost
    follows the backlog, not the size of the ledger."""
    rows = conn.execute(
        text("""
SELECT j.queue, j.org_id,
       count(*) FILTER (WHERE j.status = 'running') AS running,
       count(*) FILTER (WHERE j.status = 'queued' AND j.run_at <= now()) AS waiting,
       count(*) FILTER (WHERE j.status = 'queued' AND j.run_at <= now() AND j.held) AS held
  FROM job AS j
 WHERE j.status IN ('queued', 'running')
 GROUP BY j.queue, j.org_id""")
    ).all()
    return [Load(r.queue, r.org_id, int(r.running), int(r.waiting), int(r.held)) for r in rows]


@dataclass(frozen=True)
class Ran:
    """Seconds an org's jobs of a queue ran within the window, and their latest start."""

    queue: str
    org_id: uuid.UUID
    seconds: float
    last_start: datetime | None


@dataclass(frozen=True)
class RunningTime:
    since: datetime  # the window's start: an hour ago, or later when RAN_ROWS cut it
    until: datetime
    cut: bool
    rows: list[Ran]


def running_time(conn: Connection, *, seconds: int = 3600, rows: int = RAN_ROWS) -> RunningTime:
    """Running time per queue and org over the last `seconds`, from the job rows: the running
    jobs (from `started_at` to now) and the jobs finished within the window (from `started_at`
    to `finished_at`), each clipped to the window. The finished ones are read newest first,
    at most `rows` per finished state, from `idx_job__status_finished_at_id` (a backward
    range scan per state that stops at `rows`): bounded, whatever the throughput. When a state
    has more, the window starts at the oldest `finished_at` read. A job retried counts its
    latest attempt only (`started_at` is the latest claim's)."""
    # One branch per state, each naming its state as a constant: the partial index's predicate
    # (the finished states) is proved only from constants.
    finished = " UNION ALL ".join(
        f"""(SELECT j.org_id, j.queue, j.started_at, j.finished_at, '{state}' AS state
      FROM job AS j
     WHERE j.status = '{state}' AND j.finished_at > (SELECT since FROM bounds)
     ORDER BY j.finished_at DESC
     LIMIT :rows)"""
        for state in FINISHED
    )
    result = conn.execute(
        text(f"""
WITH bounds AS MATERIALIZED (
    SELECT now() AS until, now() - make_interval(secs => :seconds) AS since
), finished AS MATERIALIZED (
    {finished}
), cut AS MATERIALIZED (
    -- a state read to its limit: the window starts where its reading stopped
    SELECT max(oldest) AS at FROM (
        SELECT min(finished_at) AS oldest FROM finished GROUP BY state HAVING count(*) >= :rows
    ) AS full_states
), window_ AS MATERIALIZED (
    SELECT b.until, greatest(b.since, coalesce(c.at, b.since)) AS since, c.at IS NOT NULL AS cut
      FROM bounds AS b, cut AS c
), ran AS (
    SELECT org_id, queue, started_at, finished_at AS ended FROM finished
    UNION ALL
    SELECT j.org_id, j.queue, j.started_at, (SELECT until FROM bounds) FROM job AS j
     WHERE j.status = 'running'
)
SELECT w.since, w.until, w.cut, r.queue, r.org_id,
       coalesce(sum(extract(epoch FROM greatest(interval '0',
                r.ended - greatest(r.started_at, w.since)))), 0) AS seconds,
       max(r.started_at) AS last_start
  FROM window_ AS w
  LEFT JOIN ran AS r ON r.started_at IS NOT NULL AND r.ended > w.since
 GROUP BY w.since, w.until, w.cut, r.queue, r.org_id"""),
        {"seconds": seconds, "rows": rows},
    ).all()
    first = result[0]
    return RunningTime(
        since=first.since,
        until=first.until,
        cut=bool(first.cut),
        rows=[
            Ran(r.queue, r.org_id, float(r.seconds), r.last_start)
            for r in result
            if r.queue is not None
        ],
    )


@dataclass(frozen=True)
class Waiting:
    """A queued, due job: the oldest of its queue or org."""

    id: uuid.UUID
    org_id: uuid.UUID
    queue: str
    type: str
    run_at: datetime
    held: bool
    placed: bool


def oldest_waiting(conn: Connection, *, by: str) -> list[Waiting]:
    """The job due longest of each queue (`by="queue"`) or org (`by="org"`), from the queued
    rows (the backlog, like `loads`)."""
    key = {"queue": "j.queue", "org": "j.org_id"}[by]
    rows = conn.execute(
        text(f"""
SELECT DISTINCT ON ({key}) j.id, j.org_id, j.queue, j.type, j.run_at, j.held,
       j.turn IS NOT NULL AS placed
  FROM job AS j
 WHERE j.status = 'queued' AND j.run_at <= now()
 ORDER BY {key}, j.run_at, j.id""")
    ).all()
    return [Waiting(*r) for r in rows]
