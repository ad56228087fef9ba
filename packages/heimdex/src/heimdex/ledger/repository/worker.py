"""The worker's statements: claim, outcomes, heartbeat (`renew_leases`), stage boundaries, and
the rows a failure or the reaper locks. The claim and the outcomes run on the driver
(`rows.driver_rows`)."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, TextClause, text

from heimdex.ledger.repository import scopes
from heimdex.ledger.repository.rows import (
    JOB_COLUMNS,
    NOTIFY_CHANNEL,
    JobRow,
    driver_rows,
    json_array,
    notify,
    to_json,
    typed,
)
from heimdex.models import (
    DEFAULT_QUEUE,
    ERROR_CODE_MAX,
    ERROR_MESSAGE_MAX,
    STAGE_MAX,
    BackoffPolicy,
    JobStatus,
)

# THE CLAIM: a start-time fair queue. Within a priority, orgs take turns: every org's next job,
# then every org's one after (round-robin), whatever the size of each org's backlog.
# - A job is placed when it is due: it gets a `turn`, max(its org's last placed turn in its
#   queue at that priority + a step, its queue's clock). The clock (`job_turn_clock`) is about
#   the highest turn claimed so far, in any queue; a queue's clock is that, or the queue's lowest
#   placed turn at that priority when the queue is behind it (one probe of
#   `idx_job__claim_queue`, in `heimdex_private.job_queue_clock()`). With one for all, a fast pool's
#   claims carried it past a slow pool's placed turns, and the slow pool's newcomers waited
#   behind its whole backlog. The org's last turn is one probe of `idx_job__org_queue_turn` from
#   the top, in `heimdex_private.job_last_turn()` (revisions d2d60e3ca6c1, decbcd73cdc7 and
#   a9d4c6e2f8b1 say why functions, and why with sorts off). So an org's backlog takes
#   consecutive turns from where its queue stands, and an org with nothing queued there starts
#   at the clock: its new job is next, behind at most one job of each other org at that turn.
# - Jobs due at submit are placed by the submit itself (`submit._INSERT`). Jobs that come due
#   later (scheduled, retried with backoff, requeued, and those queued before turns existed)
#   wait unplaced (`turn` NULL) until the placing step (`place_due`) places them: PLACE_BATCH
#   at a time, oldest due first, one placer at a time, in a statement of its own that no claim
#   waits for. A job is placed when it comes due, not when it is queued, or a scheduled backlog
#   would come due with turns long past and run before every other org's work.
# - The claim reads one index (`idx_job__claim_queue`: queue, priority DESC, turn, run_at; placed
#   queued jobs only; a scan per queue): the first `limit` rows no other claimer holds (`FOR UPDATE
#   SKIP LOCKED`), then advances the clock, and says whether due jobs wait to be placed. No walk
#   over the orgs: the cost does not grow with the number of orgs with queued work (the walk it
#   replaced read each org's head twice per claim, through the index entries the org's claimed jobs
#   left there until the next vacuum). It places nothing: placing 1,000 due jobs in the claim made
#   it 100 ms to seconds long (a row update per job, each with its index entries), holding the rows
#   it had locked (docs/architecture.md).
# What it does not promise: two submits of one org racing at one priority may place jobs at
# the same turn (that org gets two in one round), and so may a submit racing a placing step,
# or a placing step that began just before another committed (it does not see that one's
# turns); two claims racing may set the clock a few turns back for a moment (a newcomer then
# starts a little early). None of these loses a job or starves an org.
#
# QUEUES, CAPS, SHARES AND PAUSE (docs/architecture.md, "Queues, caps, shares and pause").
# - Every job has a `queue` (its type's); a worker claims only its queues: one LIMITed scan of
#   `idx_job__claim_queue` (queue, priority DESC, turn, run_at) per queue, merged. A pool of
#   one queue reads only that queue's entries; a queue no worker serves holds nobody.
# - Weights: an org's turns advance by TURN_UNIT / its weight per job (`scopes.step`), so an
#   org of weight w takes w turns while one of weight 1 takes one: about w / (sum of the busy
#   orgs' weights) of the starts. A newcomer still starts at the clock: it waits at most one
#   job per other org and unit of that org's weight, at its priority.
# - Caps (`job_limit`: an org, an org in a queue, a queue) count jobs placed or running ("a
#   placed job holds a slot": a placed job is claimable at once). Only the placer places the
#   jobs of a capped scope (their submit leaves them unplaced), up to the room each scope has,
#   read from its row under lock (FOR UPDATE: the latest version) and incremented in the same
#   statement; the claim takes placed jobs only, so it needs no count. Every statement by
#   which a counted job stops counting gives its slot back in the same statement: outcomes
#   (and with them the reaper's), cancels, a pause's unplacing. So, at every instant, running
#   <= placed + running <= used <= max_running. The keeper recounts `used` from the job rows
#   (`limits.reconcile`): a count a cap set concurrently with its jobs' submits left wrong heals.
# - A job the placer cannot place (a full scope, a pause) is held (`held`, out of the placer's
#   index): a capped-out backlog costs no claim and no placing pass anything. The placer looks
#   at held jobs again only for a scope whose held jobs wait (`waiting`) and that has room,
#   up to that room; a claim's `more_due` says when one has.
# - Pauses (`job_pause`: a queue, a type, an org): the placer places nothing paused; a pause
#   takes its placed jobs back (slots released) and holds its queued ones; resume un-holds
#   them and NOTIFYs the workers.
PLACE_BATCH = 100
# pg_try_advisory_xact_lock(bigint): "HDXPLACE" in the bytes of a fixed key.
PLACE_LOCK_KEY = 0x48_44_58_50_4C_41_43_45


class ClaimedJob(NamedTuple):
    """What a worker needs of a claimed job, and no more: the claim is the hottest read."""

    id: uuid.UUID
    org_id: uuid.UUID
    type: str
    status: JobStatus
    params: dict[str, Any]
    priority: int
    run_at: datetime
    attempt: int
    max_attempts: int
    backoff_policy: BackoffPolicy
    lease_token: uuid.UUID
    leased_by: str
    stage: str | None
    cancel_requested: bool
    # NULL for a job that uses neither (two more columns of the row the claim updates).
    timeout_seconds: int | None
    checkpoint: dict[str, Any] | None


CLAIMED_COLUMNS = ClaimedJob._fields


@functools.cache
def claim_sql(limit: int, queues: int = 1) -> str:
    """The claim with `limit` written in: one prepared statement per batch size. As a parameter,
    the limit left PostgreSQL's plan cache without a generic plan it trusted (estimated for an
    unknown limit), so it planned the statement on every claim: 0.5 ms each, a quarter of
    PostgreSQL's CPU per job in a 200k drain. The worker's `queues` are parameters q0, q1, ...:
    one LIMITed scan of `idx_job__claim_queue` per queue, merged (no queue's backlog sorted)."""
    scans = [
        f"""(SELECT j.id, j.turn, j.priority, j.run_at
       FROM job AS j
      WHERE j.queue = %(q{i})s
        AND j.status = 'queued' AND j.turn IS NOT NULL AND j.run_at <= now()
      ORDER BY j.priority DESC, j.turn, j.run_at
      LIMIT {int(limit)}
        FOR UPDATE SKIP LOCKED)"""
        for i in range(queues)
    ]
    ready = (
        scans[0]
        if queues == 1
        else f"""SELECT * FROM ({
            " UNION ALL ".join(f"SELECT * FROM {scan} AS q{i}" for i, scan in enumerate(scans))
        }) AS u
     ORDER BY u.priority DESC, u.turn, u.run_at
     LIMIT {int(limit)}"""
    )
    return f"""
WITH ready AS (
    {ready}
), claimed AS (
    UPDATE job AS j
       SET status = 'running', started_at = now(), updated_at = now(),
           lease_token = gen_random_uuid(), leased_by = %(worker)s,
           lease_expires_at = now() + make_interval(secs => %(lease)s), heartbeat_at = now(),
           stage = NULL, progress = 0
      FROM ready
     -- `= ANY(ARRAY(...))` as well: only the primary key answers it, whatever the plan (a
     -- generic plan, not knowing `limit`, joined `ready` to a sequential scan of `job`).
     WHERE j.id = ANY(ARRAY(SELECT id FROM ready)) AND j.id = ready.id
    RETURNING {", ".join(f"j.{c}" for c in CLAIMED_COLUMNS)}
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), 'queued', 'running',
           jsonb_build_object('action', 'claimed', 'attempt', attempt, 'worker', %(worker)s)
      FROM claimed
), tick AS (
    SELECT setval('job_turn_clock', m.top)
      FROM (SELECT max(turn) AS top FROM ready) AS m, job_turn_clock AS clock
     WHERE m.top > clock.last_value
)
SELECT {", ".join(f"claimed.{c}" for c in CLAIMED_COLUMNS)}, counts.unplaced, counts.ticks
  -- `ticks` is returned so that the planner keeps it, and with it the clock's advance.
  -- `unplaced`: the oldest due job waiting to be placed, ordered so that the probe reads
  -- `idx_job__due` from its start and stops at the first (as an EXISTS, with statistics
  -- that promised many such rows, it was a sequential scan from the table's start, through
  -- every job placed since); or a capped scope with room whose held jobs wait for it (a
  -- partial index of the waiting scopes: a handful of rows).
  FROM (SELECT (SELECT u.run_at FROM job AS u
                 WHERE u.status = 'queued' AND u.turn IS NULL AND NOT u.held
                   AND u.run_at <= now()
                 ORDER BY u.run_at
                 LIMIT 1) IS NOT NULL
               -- (scopes.ROOM_TO_WAKE, in a probe that keeps to its partial index)
               OR heimdex_private.job_limit_room() AS unplaced,
               (SELECT count(*) FROM tick) AS ticks) AS counts
  LEFT JOIN claimed ON true
 ORDER BY claimed.priority DESC, claimed.run_at
"""


@dataclass(frozen=True)
class Claim:
    """What one claim took, and whether due jobs wait to be placed (`more_due`): then place
    them (`place_due`) and claim again."""

    jobs: list[ClaimedJob]
    more_due: bool


def _claimed(values: Sequence[Any]) -> ClaimedJob:
    job = ClaimedJob._make(values[:-2])
    return job._replace(
        status=JobStatus(job.status), backoff_policy=BackoffPolicy(job.backoff_policy)
    )


def claim(
    conn: Connection,
    *,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    queues: Sequence[str] = (DEFAULT_QUEUE,),
) -> Claim:
    """Take up to `limit` due placed jobs of `queues` for `worker_id`, in claim order
    (priority, then the orgs' turns, then due time): running, leased, `claimed` events (see
    THE CLAIM)."""
    if not queues:
        raise ValueError("a claim needs at least one queue")
    params: dict[str, Any] = {"worker": worker_id, "lease": lease_seconds}
    params.update({f"q{i}": q for i, q in enumerate(queues)})
    # JIT off: the one statement whose estimate once grew with the queue (db.SESSION_SETTINGS).
    values = driver_rows(conn, claim_sql(limit, len(queues)), params, local_settings=True)
    jobs = [_claimed(v) for v in values if v[0] is not None]
    return Claim(jobs, more_due=bool(values and values[0][-2]))


# The placing step (see THE CLAIM, and QUEUES, CAPS, SHARES AND PAUSE). One placer at a time:
# the advisory lock is tried, never waited for, and held to the end of the statement's
# transaction; SKIP LOCKED passes rows an operator or the reaper holds. The lock is tried before
# the due jobs are read (a one-time filter), so a second placer reads nothing.
# Candidates: the oldest PLACE_BATCH due jobs neither placed nor held, and, for each capped
# scope whose held jobs wait (`waiting`) and that has room, up to that room of its oldest held
# jobs. The capped scopes of the candidates are locked in id order and read as they are then
# (`locked`: FOR UPDATE returns the row's latest version, whatever the statement's snapshot);
# within each scope the candidates are ranked oldest due first, and a candidate is placed only
# if its rank is within the room of every scope it falls in, and it is not paused. The others
# are held (out of `idx_job__due`), and their full scopes marked `waiting`. The scopes' `used`
# grows by what was placed in them, in the same statement.
PLACE_SQL = f"""
WITH placer AS MATERIALIZED (
    SELECT pg_try_advisory_xact_lock({PLACE_LOCK_KEY}) AS alone
), clock AS (
    SELECT last_value AS turn FROM job_turn_clock
), due AS (
    SELECT j.id, j.org_id, j.queue, j.type, j.priority, j.run_at, false AS was_held
      FROM job AS j
     WHERE j.status = 'queued' AND j.turn IS NULL AND NOT j.held AND j.run_at <= now()
       AND (SELECT alone FROM placer)
     ORDER BY j.run_at
     LIMIT {PLACE_BATCH}
       FOR UPDATE SKIP LOCKED
), rooms AS MATERIALIZED (
    SELECT l.id, l.org_id, l.queue, least(l.max_running - l.used, {PLACE_BATCH}) AS room
      FROM job_limit AS l
     WHERE l.waiting AND {scopes.ROOM_TO_WAKE} AND (SELECT alone FROM placer)
), woken AS MATERIALIZED (
    SELECT h.id, h.org_id, h.queue, h.type, h.priority, h.run_at, true AS was_held, r.id AS by
      FROM rooms AS r
     CROSS JOIN LATERAL (
        SELECT j.id, j.org_id, j.queue, j.type, j.priority, j.run_at FROM job AS j
         WHERE r.org_id IS NOT NULL AND j.org_id = r.org_id
           AND j.status = 'queued' AND j.held AND j.run_at <= now()
           AND (r.queue IS NULL OR j.queue = r.queue)
         ORDER BY j.run_at
         LIMIT r.room
           FOR UPDATE SKIP LOCKED) AS h
    UNION ALL
    SELECT h.id, h.org_id, h.queue, h.type, h.priority, h.run_at, true AS was_held, r.id AS by
      FROM rooms AS r
     CROSS JOIN LATERAL (
        SELECT j.id, j.org_id, j.queue, j.type, j.priority, j.run_at FROM job AS j
         WHERE r.org_id IS NULL AND j.queue = r.queue
           AND j.status = 'queued' AND j.held AND j.run_at <= now()
         ORDER BY j.run_at
         LIMIT r.room
           FOR UPDATE SKIP LOCKED) AS h
), cand AS MATERIALIZED (
    SELECT DISTINCT ON (c.id) c.id, c.org_id, c.queue, c.type, c.priority, c.run_at, c.was_held
      FROM (SELECT id, org_id, queue, type, priority, run_at, was_held FROM due
            UNION ALL
            SELECT id, org_id, queue, type, priority, run_at, was_held FROM woken) AS c
     ORDER BY c.id
), stopped AS MATERIALIZED (
    SELECT c.id FROM cand AS c WHERE {scopes.paused("c")}
), pairs AS MATERIALIZED (
    SELECT c.id AS job, scope.id AS scope, c.run_at
      FROM cand AS c CROSS JOIN {scopes.scopes_of("c")}
     WHERE c.id NOT IN (SELECT id FROM stopped)
), locked AS MATERIALIZED (
    SELECT l.id, l.max_running - l.used AS room
      FROM job_limit AS l
     WHERE l.id = ANY(ARRAY(SELECT scope FROM pairs UNION SELECT id FROM rooms))
     ORDER BY l.id
       FOR UPDATE
), ranked AS MATERIALIZED (
    -- Round 1: each scope's room to its oldest candidates; those within it in every scope
    -- they fall in go together (in each scope they are among the first `room`).
    SELECT p.job, p.scope, k.room,
           row_number() OVER (PARTITION BY p.scope ORDER BY p.run_at, p.job) <= k.room AS fits
      FROM pairs AS p JOIN locked AS k ON k.id = p.scope
), first_round AS MATERIALIZED (
    SELECT c.id FROM cand AS c
     WHERE c.id NOT IN (SELECT id FROM stopped)
       AND NOT EXISTS (SELECT FROM ranked AS r WHERE r.job = c.id AND NOT coalesce(r.fits, false))
), left_room AS MATERIALIZED (
    SELECT k.id, coalesce(k.room, 0) - count(f.id) AS room
      FROM locked AS k
      LEFT JOIN pairs AS p ON p.scope = k.id
      LEFT JOIN first_round AS f ON f.id = p.job
     GROUP BY k.id, k.room
), second_round AS MATERIALIZED (
    -- Round 2: what is left of each scope's room to the oldest of the others, among those whose
    -- every scope has room left (a job a full scope blocks takes no other scope's room).
    SELECT r.job AS id
      FROM (SELECT p.job, p.scope, l.room,
                   row_number() OVER (PARTITION BY p.scope ORDER BY p.run_at, p.job) AS rank
              FROM pairs AS p JOIN left_room AS l ON l.id = p.scope
             WHERE p.job NOT IN (SELECT id FROM first_round)
               AND NOT EXISTS (SELECT FROM pairs AS q JOIN left_room AS m ON m.id = q.scope
                                WHERE q.job = p.job AND m.room <= 0)) AS r
     GROUP BY r.job
    HAVING bool_and(r.rank <= r.room)
), decided AS MATERIALIZED (
    SELECT c.id, c.org_id, c.queue, c.priority, c.run_at, c.was_held,
           c.id NOT IN (SELECT id FROM first_round UNION ALL SELECT id FROM second_round)
             AS hold
      FROM cand AS c
), blocked AS MATERIALIZED (
    -- the scopes that hold a job now: full ones, and any a job was newly held in
    SELECT DISTINCT p.scope
      FROM pairs AS p
      JOIN decided AS d ON d.id = p.job AND d.hold
      JOIN left_room AS l ON l.id = p.scope
     WHERE NOT d.was_held OR l.room <= 0 OR l.room IS NULL
), firsts AS MATERIALIZED (
    SELECT q.org_id, q.queue, q.priority, q.step,
           greatest(heimdex_private.job_last_turn(q.org_id, q.queue, q.priority, q.clock)
                    + q.step, q.clock) AS turn
      FROM (SELECT k.*, heimdex_private.job_queue_clock(k.queue, k.priority, clock.turn)
                          AS clock
              FROM (SELECT g.org_id, g.queue, g.priority, {scopes.step("g")} AS step
                      FROM (SELECT DISTINCT org_id, queue, priority FROM decided WHERE NOT hold)
                           AS g) AS k
             CROSS JOIN clock) AS q
), numbered AS (
    SELECT d.id, d.hold,
           f.turn + (row_number() OVER (PARTITION BY d.org_id, d.queue, d.priority, d.hold
                                        ORDER BY d.run_at, d.id) - 1) * f.step AS turn
      FROM decided AS d
      LEFT JOIN firsts AS f
        ON NOT d.hold AND f.org_id = d.org_id AND f.queue = d.queue AND f.priority = d.priority
     -- a held job held again is left as it is (no row version for nothing)
     WHERE NOT (d.hold AND d.was_held)
), moved AS (
    UPDATE job AS j SET turn = CASE WHEN n.hold THEN NULL ELSE n.turn END, held = n.hold
      FROM numbered AS n
     WHERE j.id = ANY(ARRAY(SELECT id FROM numbered)) AND j.id = n.id
    RETURNING j.id, n.hold
), taken AS (
    SELECT p.scope, count(*) AS n
      FROM pairs AS p JOIN decided AS d ON d.id = p.job AND NOT d.hold
     GROUP BY p.scope
), counted AS (
    -- `waiting`: a scope that held a job waits; one whose held jobs were looked for waits
    -- on while it found as many as it had room for and placed some of them.
    UPDATE job_limit AS l
       SET used = l.used + coalesce(t.n, 0),
           waiting = l.id IN (SELECT scope FROM blocked)
                     OR CASE WHEN l.id IN (SELECT id FROM rooms)
                             THEN (SELECT count(*) FROM woken AS w WHERE w.by = l.id)
                                  >= (SELECT r.room FROM rooms AS r WHERE r.id = l.id)
                                  AND EXISTS (SELECT FROM woken AS w JOIN decided AS d
                                                ON d.id = w.id AND NOT d.hold
                                               WHERE w.by = l.id)
                             ELSE l.waiting END
      FROM locked AS k LEFT JOIN taken AS t ON t.scope = k.id
     WHERE l.id = k.id
), wake AS (
    SELECT pg_notify('{NOTIFY_CHANNEL}', '') WHERE EXISTS (SELECT FROM moved WHERE NOT hold)
)
SELECT (SELECT alone FROM placer), (SELECT count(*) FROM moved WHERE NOT hold),
       (SELECT count(*) FROM moved), (SELECT count(*) FROM wake)
"""
# Passes of one `place_due` call that only hold jobs (a capped-out backlog coming due) before
# it returns: a backlog of PLACE_BATCH * HOLD_PASSES jobs is set aside in one call.
HOLD_PASSES = 20


def place_due(conn: Connection) -> int | None:
    """Place the next PLACE_BATCH due unplaced jobs, oldest due first, and the held jobs that
    capped scopes now have room for, within every cap (see THE CLAIM and QUEUES, CAPS, SHARES
    AND PAUSE); hold the others. Wakes idle workers when some were placed; one statement.
    Returns how many it placed, or None when another placer is at work (nothing done: its
    NOTIFY will say when it placed some)."""
    for _ in range(HOLD_PASSES):
        ((alone, placed, moved, _),) = driver_rows(conn, PLACE_SQL, {})
        if not alone:
            return None
        if placed or not moved:
            return int(placed)
    return 0


@dataclass(frozen=True)
class Outcome:
    """How a running attempt ends, decided by the service: the row's next values and event."""

    job_id: uuid.UUID
    lease_token: uuid.UUID | None
    status: JobStatus
    attempt: int
    detail: Mapping[str, Any]
    delay_seconds: float = 0.0
    result: Mapping[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None


# KEY LOOKUPS. The statements that touch a handful of known jobs (outcomes, the rows a failure
# locks) find them by primary key and compare the status as text. Compared as an enum,
# `status = 'running'` matches the status index; when the queue has grown since the last
# ANALYZE, the planner then believes a few rows match and reads every running or queued row
# (and the dead ones) through a bitmap, then hashes them: measured, 10,950 index entries and
# 468 heap pages to update 10 jobs.
_OUTCOMES = f"""
WITH t AS (
    SELECT * FROM jsonb_to_recordset(CAST(%(outcomes)s AS jsonb))
      AS t(id uuid, token uuid, status text, attempt int, delay float8, result jsonb,
           code text, message text, detail jsonb)
), upd AS (
    UPDATE job AS j
       SET status = t.status::job_status,
           attempt = t.attempt,
           result = coalesce(t.result, j.result),
           progress = CASE WHEN t.status = 'succeeded' THEN 100 ELSE j.progress END,
           run_at = CASE WHEN t.status = 'queued'
                         THEN now() + make_interval(secs => t.delay) ELSE j.run_at END,
           finished_at = CASE WHEN t.status = 'queued' THEN NULL ELSE now() END,
           updated_at = now(),
           last_error_code = CASE WHEN t.code IS NULL AND t.message IS NULL
                                  THEN j.last_error_code ELSE t.code END,
           last_error_message = CASE WHEN t.code IS NULL AND t.message IS NULL
                                     THEN j.last_error_message ELSE t.message END,
           lease_token = NULL, leased_by = NULL, lease_expires_at = NULL,
           turn = NULL  -- a requeued job is placed again when due (`place_due`)
      FROM t
     WHERE j.id = ANY(%(ids)s::uuid[]) AND j.id = t.id
       AND j.status::text = 'running' AND j.lease_token IS NOT DISTINCT FROM t.token
    RETURNING j.id, j.type, t.status, t.delay, t.detail, j.org_id, j.queue
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), 'running', status, detail FROM upd
), {scopes.release("upd")}
SELECT id, type, status, delay, (SELECT coalesce(bool_or(waiting), false) FROM freed) FROM upd
"""


def write_outcomes(conn: Connection, outcomes: Sequence[Outcome]) -> dict[uuid.UUID, str]:
    """End running attempts still holding their lease, with their events; one statement.

    Returns the ids written, with each job's type; an outcome missing from it lost its lease
    (the reaper or a cancel got there first) and changed nothing. Requeued jobs due now wake
    idle workers.
    """
    if not outcomes:
        return {}
    payload = [
        {
            "id": str(o.job_id),
            "token": str(o.lease_token) if o.lease_token else None,
            "status": o.status.value,
            "attempt": o.attempt,
            "delay": float(o.delay_seconds),
            "result": o.result,
            "code": o.error_code[:ERROR_CODE_MAX] if o.error_code else None,
            "message": o.error_message[:ERROR_MESSAGE_MAX] if o.error_message else None,
            "detail": o.detail,
        }
        for o in outcomes
    ]
    rows = driver_rows(
        conn, _OUTCOMES, {"outcomes": json_array(payload), "ids": [o.job_id for o in outcomes]}
    )
    # Wake idle workers for requeued jobs due now, and for held jobs a freed slot lets in.
    if any(
        (status == JobStatus.QUEUED.value and delay <= 0) or waiting
        for _, _, status, delay, waiting in rows
    ):
        notify(conn)
    return {job_id: type_ for job_id, type_, _, _, _ in rows}


def lock_held(conn: Connection, held: Sequence[tuple[uuid.UUID, uuid.UUID]]) -> list[JobRow]:
    """The running jobs whose lease is still held by these (job id, lease token), locked."""
    return list(
        conn.execute(
            typed(f"""
SELECT {JOB_COLUMNS}
  FROM job AS j
  JOIN unnest(CAST(:ids AS uuid[]), CAST(:tokens AS uuid[])) AS h(id, token)
    ON j.id = h.id AND j.lease_token = h.token
 WHERE j.id = ANY(CAST(:ids AS uuid[])) AND j.status::text = 'running'
 ORDER BY j.id
   FOR UPDATE OF j"""),
            {"ids": [i for i, _ in held], "tokens": [t for _, t in held]},
        ).all()
    )


def lock_expired(conn: Connection, *, stale_after_seconds: float, limit: int) -> list[JobRow]:
    """Running jobs whose lease expired, locked; SKIP LOCKED keeps reapers out of each other's
    way. Rows running without a lease (from before leases) count once untouched that long."""
    return list(
        conn.execute(
            typed(f"""
SELECT {JOB_COLUMNS}
  FROM job AS j
 WHERE j.status = 'running'
   AND (j.lease_expires_at < now()
        OR (j.lease_expires_at IS NULL
            AND j.updated_at < now() - make_interval(secs => :stale)))
 ORDER BY j.lease_expires_at NULLS FIRST
 LIMIT :limit
   FOR UPDATE SKIP LOCKED"""),
            {"stale": stale_after_seconds, "limit": limit},
        ).all()
    )


# A claimed job counts as started (the claim sets `started_at`) until its worker records it as
# waiting unstarted; the reaper charges an expired lease only when `started_at` is set.
_PREFETCHED = text("""
UPDATE job AS j SET started_at = NULL
  FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS uuid[])) AS h(id, token)
 WHERE j.id = ANY(CAST(:ids AS uuid[])) AND j.id = h.id AND j.lease_token = h.token
   AND j.status::text = 'running'
RETURNING j.id""")
_START = text("""
UPDATE job SET started_at = now()
 WHERE id = :id AND lease_token = :token AND status::text = 'running'
RETURNING id""")


def record_prefetched(
    conn: Connection, held: Sequence[tuple[uuid.UUID, uuid.UUID]]
) -> set[uuid.UUID]:
    """Record held jobs (id, lease token) as claimed but not started: if their worker is lost,
    the reaper returns them to the queue uncharged. One statement; the ids recorded."""
    if not held:
        return set()
    rows = conn.execute(
        _PREFETCHED, {"ids": [i for i, _ in held], "tokens": [t for _, t in held]}
    ).all()
    return {r.id for r in rows}


def record_start(conn: Connection, job_id: uuid.UUID, token: uuid.UUID) -> bool:
    """Record that a held job's handler starts now (after `record_prefetched`); False when the
    lease is no longer held."""
    return conn.execute(_START, {"id": job_id, "token": token}).one_or_none() is not None


def renew_leases(
    conn: Connection, tokens: Sequence[uuid.UUID], *, lease_seconds: float
) -> set[uuid.UUID]:
    """Extend every lease in `tokens`; one statement. Returns the tokens still held."""
    if not tokens:
        return set()
    rows = conn.execute(
        text("""
UPDATE job
   SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => :lease)
 WHERE status = 'running' AND lease_token = ANY(CAST(:tokens AS uuid[]))
RETURNING lease_token"""),
        {"tokens": list(tokens), "lease": lease_seconds},
    ).all()
    return {r.lease_token for r in rows}


def _stage_sql(*, checkpoint: bool) -> TextClause:
    saved = ", checkpoint = CAST(:checkpoint AS jsonb)" if checkpoint else ""
    action = "checkpoint" if checkpoint else "progress"
    return text(f"""
WITH cur AS (
    SELECT id, cancel_requested FROM job
     WHERE id = :id AND lease_token = :token AND status = 'running'
       FOR UPDATE
), upd AS (
    UPDATE job AS j SET stage = :stage, progress = :progress, updated_at = now(){saved}
      FROM cur
     WHERE j.id = cur.id AND NOT cur.cancel_requested
    RETURNING j.id
), ev AS (
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT id, clock_timestamp(), 'running', 'running',
           jsonb_build_object('action', '{action}', 'stage', CAST(:stage AS text),
                              'progress', CAST(:progress AS int))
      FROM upd
)
SELECT cancel_requested FROM cur
""")


_STAGE = _stage_sql(checkpoint=False)
_CHECKPOINT = _stage_sql(checkpoint=True)


def record_stage(
    conn: Connection,
    job_id: uuid.UUID,
    token: uuid.UUID,
    *,
    stage: str,
    progress: int,
    checkpoint: Mapping[str, Any] | None = None,
) -> bool | None:
    """Record a stage boundary of a held attempt, with its event; one statement. With
    `checkpoint` (the handler's saved state, see `checkpoint_of`), the same statement saves it
    with the job.

    Returns False when recorded, True when a cancel was requested instead (nothing recorded),
    None when the attempt no longer holds the lease.
    """
    stage = stage[:STAGE_MAX]
    progress = max(0, min(100, progress))
    params: dict[str, Any] = {"id": job_id, "token": token, "stage": stage, "progress": progress}
    statement = _STAGE
    if checkpoint is not None:
        statement = _CHECKPOINT
        params["checkpoint"] = to_json(checkpoint_of(stage, progress, checkpoint))
    value = conn.execute(statement, params).scalar_one_or_none()
    return None if value is None else bool(value)


def checkpoint_of(stage: str, progress: int, state: Mapping[str, Any]) -> dict[str, Any]:
    """What `job.checkpoint` holds: the stage it was saved at, its progress, the state."""
    return {"stage": stage, "progress": progress, "state": dict(state)}


_RESUMED = text("""
INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
SELECT id, clock_timestamp(), 'running', 'running', CAST(:detail AS jsonb)
  FROM job
 WHERE id = :id AND lease_token = :token AND status = 'running'
RETURNING job_id
""")


def record_resumed(
    conn: Connection, job_id: uuid.UUID, token: uuid.UUID, detail: Mapping[str, Any]
) -> bool:
    """The event of an attempt that resumes from a checkpoint (what it skips); False when the
    attempt no longer holds the lease."""
    row = conn.execute(_RESUMED, {"id": job_id, "token": token, "detail": to_json(detail)}).first()
    return row is not None
