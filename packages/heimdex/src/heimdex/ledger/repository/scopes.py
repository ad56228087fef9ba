"""SQL fragments of queues, caps, weights and pauses that the submit, the claim, the placer, the
outcomes and the operators' statements share (see QUEUES, CAPS, SHARES AND PAUSE in `worker`).

A cap's scope is a `job_limit` row: an org (queue NULL), an org in a queue, or a queue (org
NULL). A job counts against every capped scope it falls in while it is placed or running ("a
placed job holds a slot": a placed job is claimable at once).
"""

from __future__ import annotations

# Turns advance by TURN_UNIT / weight per job: an org of weight w takes w turns in the time an
# org of weight 1 takes one. 720720 is divisible by every weight from 1 to 16, and a bigint
# holds 10^13 rounds of it.
TURN_UNIT = 720720
# A capped scope `l`'s held jobs are looked at again once a quarter of its cap is free (at
# least one slot, at most a placing batch): a placing pass per that many outcomes rather than
# per outcome. Placed jobs are claimable at once, so the cap still runs at least three
# quarters full while its org has held jobs.
# `heimdex_private.job_limit_room()` (revision a9d4c6e2f8b1) holds the same rule.
ROOM_TO_WAKE = "l.max_running - l.used >= greatest(1, least(100, l.max_running / 4))"


def scopes_of(alias: str) -> str:
    """A LATERAL subquery: the ids of the capped scopes a row `alias` (with org_id, queue)
    falls in. Two probes of the scope's unique index, whatever the number of rows."""
    return f"""LATERAL (
        SELECT l.id FROM job_limit AS l
         WHERE l.org_id = {alias}.org_id AND l.max_running IS NOT NULL
           AND (l.queue IS NULL OR l.queue = {alias}.queue)
        UNION ALL
        SELECT l.id FROM job_limit AS l
         WHERE l.org_id IS NULL AND l.queue = {alias}.queue AND l.max_running IS NOT NULL
    ) AS scope"""


def paused(alias: str) -> str:
    """True when a row `alias` (org_id, queue, type) is in a paused queue, type or org."""
    return f"""EXISTS (SELECT FROM job_pause AS p
                WHERE (p.kind, p.value) IN (('queue', {alias}.queue), ('type', {alias}.type),
                                            ('org', {alias}.org_id::text)))"""


def gated(alias: str) -> str:
    """True when a row `alias` must go through the placer rather than be placed by its submit:
    a cap of its scope is set, or it is paused."""
    return f"""(EXISTS (SELECT FROM job_limit AS l
                 WHERE l.org_id = {alias}.org_id AND l.max_running IS NOT NULL
                   AND (l.queue IS NULL OR l.queue = {alias}.queue))
             OR EXISTS (SELECT FROM job_limit AS l
                 WHERE l.org_id IS NULL AND l.queue = {alias}.queue
                   AND l.max_running IS NOT NULL)
             OR {paused(alias)})"""


def step(alias: str) -> str:
    """How far an org's turn advances per job: TURN_UNIT / its weight."""
    return f"""coalesce((SELECT {TURN_UNIT} / w.weight FROM job_limit AS w
                  WHERE w.org_id = {alias}.org_id AND w.queue IS NULL), {TURN_UNIT})"""


def release(source: str) -> str:
    """CTEs (to follow a `WITH ... ,`) that give back the slots of the jobs in CTE `source`
    (columns org_id, queue; one row per job leaving placed-or-running): the scope rows are
    locked in id order (no two statements wait for each other's), then decremented. `freed`
    returns whether held jobs of each scope now have room to be placed (then wake the workers)."""
    return f"""rel AS (
    SELECT scope.id, count(*) AS n FROM {source} AS r CROSS JOIN {scopes_of("r")}
     GROUP BY scope.id
), rel_locked AS (
    SELECT l.id FROM job_limit AS l
     WHERE l.id = ANY(ARRAY(SELECT id FROM rel))
     ORDER BY l.id
       FOR UPDATE
), freed AS (
    UPDATE job_limit AS l SET used = greatest(l.used - rel.n, 0)
      FROM rel JOIN rel_locked AS k ON k.id = rel.id
     WHERE l.id = rel.id
    RETURNING l.waiting AND coalesce({ROOM_TO_WAKE}, false) AS waiting
)"""
