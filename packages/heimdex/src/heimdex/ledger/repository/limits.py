"""The operators' statements on caps, weights and pauses (`job_limit`, `job_pause`), their audit
log (`job_control_event`), and the keeper's recount of the slots (see QUEUES, CAPS, SHARES AND
PAUSE in `worker`). Every change waits for the placer's lock first: no placing pass runs on
values a change is replacing, and the statements after it read what the placer committed."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from heimdex.ledger.repository import scopes
from heimdex.ledger.repository.rows import notify, to_json
from heimdex.ledger.repository.worker import PLACE_LOCK_KEY


@dataclass(frozen=True)
class Limit:
    org_id: uuid.UUID | None
    queue: str | None
    max_running: int | None
    weight: int
    used: int
    waiting: bool
    updated_at: datetime


@dataclass(frozen=True)
class Pause:
    kind: str
    value: str
    actor: str
    reason: str
    since: datetime


def lock_placer(conn: Connection) -> None:
    """Wait for the placer's lock, held to the end of the caller's transaction."""
    conn.execute(text(f"SELECT pg_advisory_xact_lock({PLACE_LOCK_KEY})"))


# A job counts against a scope while placed or running.
_COUNTED = "(j.status = 'running' OR (j.status = 'queued' AND j.turn IS NOT NULL))"
_IN_SCOPE = "(l.org_id IS NULL OR j.org_id = l.org_id) AND (l.queue IS NULL OR j.queue = l.queue)"


def _recount(where: str) -> str:
    # `waiting` too: held jobs of a scope wait for it (set again here in case a placing pass
    # let it go while another scope held them).
    return f"""
UPDATE job_limit AS l
   SET used = (SELECT count(*) FROM job AS j WHERE {_IN_SCOPE} AND {_COUNTED}),
       waiting = EXISTS (SELECT FROM job AS j WHERE {_IN_SCOPE}
                            AND j.status = 'queued' AND j.held)
 WHERE l.max_running IS NOT NULL AND {where}
RETURNING l.id, l.used"""


def set_limit(
    conn: Connection,
    *,
    org_id: uuid.UUID | None,
    queue: str | None,
    max_running: int | None,
    weight: int | None,
) -> Limit:
    """Create or change a scope's cap (`max_running`) and/or weight (None: unchanged); the cap's
    slots are counted from the job rows. The caller holds the placer's lock (`lock_placer`)."""
    conn.execute(
        text("""
INSERT INTO job_limit AS l (org_id, queue, max_running, weight)
VALUES (:org, :queue, :max_running, coalesce(:weight, 1))
ON CONFLICT (org_id, queue) DO UPDATE
   SET max_running = CASE WHEN CAST(:max_running AS int) IS NULL THEN l.max_running
                          ELSE CAST(:max_running AS int) END,
       weight = coalesce(CAST(:weight AS int), l.weight),
       updated_at = now()"""),
        {"org": org_id, "queue": queue, "max_running": max_running, "weight": weight},
    )
    conn.execute(
        text(_recount("l.org_id IS NOT DISTINCT FROM :org AND l.queue IS NOT DISTINCT FROM :q")),
        {"org": org_id, "q": queue},
    )
    limit = get_limit(conn, org_id=org_id, queue=queue)
    assert limit is not None
    if limit.waiting:
        notify(conn)  # a raised cap lets held jobs in
    return limit


def unset_limit(
    conn: Connection, *, org_id: uuid.UUID | None, queue: str | None, cap: bool, weight: bool
) -> Limit | None:
    """Drop a scope's cap and/or weight; the row goes when neither is left. Held jobs of a
    scope no longer capped go back to the placer. Returns the row as it was, None if none."""
    before = get_limit(conn, org_id=org_id, queue=queue)
    if before is None:
        return None
    params = {"org": org_id, "q": queue}
    scope = "l.org_id IS NOT DISTINCT FROM :org AND l.queue IS NOT DISTINCT FROM :q"
    conn.execute(
        text(f"""
UPDATE job_limit AS l
   SET max_running = CASE WHEN :cap THEN NULL ELSE l.max_running END,
       weight = CASE WHEN :weight THEN 1 ELSE l.weight END,
       used = CASE WHEN :cap THEN 0 ELSE l.used END,
       waiting = CASE WHEN :cap THEN false ELSE l.waiting END,
       updated_at = now()
 WHERE {scope}"""),
        {**params, "cap": cap, "weight": weight},
    )
    conn.execute(
        text(
            f"DELETE FROM job_limit AS l WHERE {scope} AND l.max_running IS NULL AND l.weight = 1"
        ),
        params,
    )
    if cap and before.max_running is not None:
        unhold(conn, org_id=org_id, queue=queue)
    return before


def unhold(
    conn: Connection,
    *,
    org_id: uuid.UUID | None = None,
    queue: str | None = None,
    type: str | None = None,
) -> int:
    """Give the held jobs of a scope back to the placer (it holds again those still capped or
    paused) and wake the workers; how many."""
    clauses = ["j.status = 'queued'", "j.held"]
    if org_id is not None:
        clauses.append("j.org_id = :org")
    if queue is not None:
        clauses.append("j.queue = :queue")
    if type is not None:
        clauses.append("j.type = :type")
    count = len(
        conn.execute(
            text(f"UPDATE job AS j SET held = false WHERE {' AND '.join(clauses)} RETURNING j.id"),
            {"org": org_id, "queue": queue, "type": type},
        ).all()
    )
    if count:
        notify(conn)
    return count


_LIMIT_COLUMNS = "org_id, queue, max_running, weight, used, waiting, updated_at"


def get_limit(conn: Connection, *, org_id: uuid.UUID | None, queue: str | None) -> Limit | None:
    row = conn.execute(
        text(f"""SELECT {_LIMIT_COLUMNS} FROM job_limit
                  WHERE org_id IS NOT DISTINCT FROM :org AND queue IS NOT DISTINCT FROM :q"""),
        {"org": org_id, "q": queue},
    ).first()
    return None if row is None else Limit(*row)


def list_limits(conn: Connection) -> list[Limit]:
    rows = conn.execute(
        text(f"SELECT {_LIMIT_COLUMNS} FROM job_limit ORDER BY queue NULLS FIRST, org_id, id")
    ).all()
    return [Limit(*r) for r in rows]


def reconcile(conn: Connection) -> int:
    """Recount every cap's slots from the job rows, and which scopes held jobs wait for: a
    count left wrong (a cap set while its jobs were submitted) heals here. The caller holds
    the placer's lock; the capped rows are locked first, in id order (an outcome releasing a
    slot meanwhile waits, and is counted as still running, then gives its slot back). Returns
    how many counts changed."""
    rows = conn.execute(
        text("SELECT id, used FROM job_limit WHERE max_running IS NOT NULL ORDER BY id FOR UPDATE")
    ).all()
    before: dict[int, int] = {int(r.id): int(r.used) for r in rows}
    after = conn.execute(text(_recount("true"))).all()
    return sum(1 for r in after if before.get(int(r.id)) != int(r.used))


def pause(
    conn: Connection, *, kind: str, value: str, actor: str, reason: str
) -> tuple[Pause, int] | None:
    """Pause a queue, type or org: its placed jobs are taken back (their slots released) and
    its queued jobs held. The caller holds the placer's lock. Returns the pause and how many
    jobs were held, or None when it was already paused (nothing changed)."""
    row = conn.execute(
        text("""
INSERT INTO job_pause (kind, value, actor, reason) VALUES (:kind, :value, :actor, :reason)
ON CONFLICT (kind, value) DO NOTHING
RETURNING kind, value, actor, reason, since"""),
        {"kind": kind, "value": value, "actor": actor, "reason": reason},
    ).first()
    if row is None:
        return None
    return Pause(*row), hold_paused(conn, kind=kind, value=value)


_KIND_COLUMN = {"queue": "j.queue", "type": "j.type", "org": "j.org_id::text"}


def hold_paused(conn: Connection, *, kind: str, value: str) -> int:
    """Hold the queued jobs of a paused scope (placed ones give their slot back); one
    statement. A submit that read the pause table before the pause committed may have placed
    one since: `pause` runs this again after its commit."""
    count = conn.execute(
        text(f"""
WITH hit AS (
    SELECT j.id, j.org_id, j.queue, j.turn IS NOT NULL AS placed FROM job AS j
     WHERE {_KIND_COLUMN[kind]} = :value AND j.status = 'queued'
       AND (j.turn IS NOT NULL OR NOT j.held)
     ORDER BY j.id
       FOR UPDATE
), upd AS (
    UPDATE job AS j SET turn = NULL, held = true
      FROM hit WHERE j.id = hit.id
    RETURNING j.id
), placed AS (
    SELECT org_id, queue FROM hit WHERE placed
), {scopes.release("placed")}
SELECT count(*) FROM upd"""),
        {"value": value},
    ).scalar_one()
    return int(count)


def resume(conn: Connection, *, kind: str, value: str) -> Pause | None:
    """Lift a pause; its held jobs go back to the placer and the workers wake (NOTIFY). None
    when it was not paused."""
    row = conn.execute(
        text("""
DELETE FROM job_pause WHERE kind = :kind AND value = :value
RETURNING kind, value, actor, reason, since"""),
        {"kind": kind, "value": value},
    ).first()
    if row is None:
        return None
    if kind == "org":
        unhold(conn, org_id=uuid.UUID(value))
    elif kind == "queue":
        unhold(conn, queue=value)
    else:
        unhold(conn, type=value)
    notify(conn)
    return Pause(*row)


def list_pauses(conn: Connection) -> list[Pause]:
    rows = conn.execute(
        text("SELECT kind, value, actor, reason, since FROM job_pause ORDER BY kind, value")
    ).all()
    return [Pause(*r) for r in rows]


def record_event(
    conn: Connection, *, action: str, scope: Mapping[str, Any], actor: str, reason: str
) -> None:
    conn.execute(
        text("""
INSERT INTO job_control_event (action, scope, actor, reason)
VALUES (:action, CAST(:scope AS jsonb), :actor, :reason)"""),
        {"action": action, "scope": to_json(scope), "actor": actor, "reason": reason},
    )


def list_events(conn: Connection, *, limit: int = 50) -> list[dict[str, Any]]:
    rows = conn.execute(
        text("""SELECT ts, action, scope, actor, reason FROM job_control_event
                 ORDER BY ts DESC, id LIMIT :limit"""),
        {"limit": limit},
    ).all()
    return [dict(r._mapping) for r in rows]
