"""The ledger's figures: the queue gauges (`queue_stats`, every process's metrics) and the
dashboard's counts, oldest due job and throughput."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import Connection, text

from heimdex.ledger.repository.rows import JOB_COLUMNS, JobRow, typed


@dataclass(frozen=True)
class QueueStats:
    type: str
    queued: int
    due: int
    running: int
    oldest_due_seconds: float


def queue_stats(conn: Connection) -> list[QueueStats]:
    """Per type: queued and due jobs, running jobs, and the age of the oldest due job.

    Reads only unfinished rows (the claim index and the status index), never the finished
    history, so its cost follows the backlog, not the size of the ledger.
    """
    rows = conn.execute(
        text("""
SELECT type,
       count(*) FILTER (WHERE status = 'queued') AS queued,
       count(*) FILTER (WHERE status = 'queued' AND run_at <= now()) AS due,
       count(*) FILTER (WHERE status = 'running') AS running,
       coalesce(extract(epoch FROM now() - min(run_at)
                FILTER (WHERE status = 'queued' AND run_at <= now())), 0) AS oldest
  FROM job
 WHERE status IN ('queued', 'running')
 GROUP BY type
 ORDER BY type""")
    ).all()
    return [
        QueueStats(r.type, int(r.queued), int(r.due), int(r.running), float(r.oldest)) for r in rows
    ]


@dataclass(frozen=True)
class Counts:
    status: str
    type: str
    org_id: uuid.UUID
    jobs: int


def counts(conn: Connection, *, org_id: uuid.UUID | None = None) -> list[Counts]:
    """Jobs by (status, type, org), every org or one. Reads the whole ledger (or the org's
    part, by its index): an operator's question, not a hot path."""
    sql = "SELECT j.status::text AS status, j.type, j.org_id, count(*) AS jobs FROM job AS j"
    if org_id is not None:
        sql += " WHERE j.org_id = :org"
    sql += " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    return [
        Counts(r.status, r.type, r.org_id, int(r.jobs))
        for r in conn.execute(text(sql), {"org": org_id}).all()
    ]


def oldest_due(conn: Connection, *, org_id: uuid.UUID | None = None) -> JobRow | None:
    """The queued job that has been due longest, if any."""
    sql = f"SELECT {JOB_COLUMNS} FROM job AS j WHERE j.status = 'queued' AND j.run_at <= now()"
    if org_id is not None:
        sql += " AND j.org_id = :org"
    sql += " ORDER BY j.run_at, j.id LIMIT 1"
    return conn.execute(typed(sql), {"org": org_id}).one_or_none()


@dataclass(frozen=True)
class Minute:
    minutes_ago: int
    succeeded: int
    failed: int


def throughput(conn: Connection, *, minutes: int, org_id: uuid.UUID | None = None) -> list[Minute]:
    """Attempts ended per minute over the last `minutes` (0 = the current minute), read from
    the events (their `ts` index): succeeded, and failed (every attempt that ended with an
    error, retried or not). Minutes with nothing are included as zeros."""
    join = " JOIN job AS j ON j.id = e.job_id AND j.org_id = :org" if org_id else ""
    rows = conn.execute(
        text(f"""
SELECT floor(extract(epoch FROM now() - e.ts) / 60)::int AS ago,
       count(*) FILTER (WHERE e.next_status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE e.detail_json -> 'error' IS NOT NULL) AS failed
  FROM job_event AS e{join}
 WHERE e.ts > now() - make_interval(mins => :minutes)
   AND e.prev_status = 'running' AND e.next_status <> 'running'
 GROUP BY 1"""),
        {"minutes": minutes, "org": org_id},
    ).all()
    by_minute = {r.ago: r for r in rows}
    return [
        Minute(m, int(by_minute[m].succeeded), int(by_minute[m].failed))
        if m in by_minute
        else Minute(m, 0, 0)
        for m in range(minutes)
    ]
