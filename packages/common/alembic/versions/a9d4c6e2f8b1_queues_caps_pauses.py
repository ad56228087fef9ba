"""queues, caps, weights and pauses: job.queue, job.held, job_limit, job_pause, job_control_event

Revision ID: a9d4c6e2f8b1
Revises: c9e2b4d6f8a1

- `job.queue` (varchar(100), NOT NULL DEFAULT 'default'): the pool a job runs in; a worker
  claims only its queues. `job.held` (boolean, NOT NULL DEFAULT false): a queued job the placer
  set aside because a cap of its scope is full or its queue, type or org is paused; held jobs
  leave the placer's index, so a capped-out backlog costs no placing pass anything.
- `job_limit`: per scope (an org, an org in a queue, or a queue), the most jobs placed or
  running at once (`max_running`, NULL: no cap) and the slots counted against it (`used`, a
  semaphore the placer takes under row lock and every outcome, cancel and pause gives back),
  and an org's weight in the fair queue (`weight`, on the org's row without a queue).
- `job_pause`: the paused queues, types and orgs, with who paused them and why.
- `job_control_event`: the audit log of limit and pause changes (actor, reason).
- `idx_job__claim_queue` (queue, priority DESC, turn, run_at) replaces `idx_job__claim_order`:
  a worker's claim reads only its queues' entries. `idx_job__due` (run_at, jobs unplaced and
  not held) replaces `idx_job__unplaced`. `idx_job__held_org` and `idx_job__held_queue`: the
  held jobs of a scope, oldest first, for the placer when the scope has room and for resume.
- Each queue keeps its own clock: a job is placed after its org's last turn *in its queue*
  (`heimdex_private.job_last_turn(org, queue, prio, floor)` on `idx_job__org_queue_turn`, which
  replaces `idx_job__org_turn`), never before its queue's clock (`heimdex_private.
  job_queue_clock(queue, prio, floor)`: the clock `floor`, or the queue's lowest placed turn at
  that priority when it is behind it; one probe of `idx_job__claim_queue`). With one clock for
  every queue, a fast pool's claims carried
  it far past a slow pool's placed turns, and a newcomer's job in the slow pool waited behind
  that pool's whole backlog. The three-argument `job_last_turn` stays for the previous release.
- `idx_job_limit__room`: the capped scopes whose held jobs wait and that have room again, which
  every claim asks about (a handful of rows, however many orgs have a cap or a weight), read in
  `heimdex_private.job_limit_room()` with the same settings as the probes above: the planner,
  not knowing that waiting scopes are mostly full ones, preferred a sequential scan.

Cost on a live table: the two columns have constant defaults (catalog only since PostgreSQL 11,
no rewrite, under lock_timeout); the indexes are built and the old ones dropped CONCURRENTLY
with the online toolkit (no writer waits). The new tables are created empty. Backend only: row
level security with no policy, no grant to the Data API roles.

Downgrade builds the old indexes again, then drops the new ones, the tables and the columns
(queues, caps and pauses are forgotten; the previous release claims every job).
"""

from __future__ import annotations

from alembic import op

from heimdex_db.online import create_index, ddl, drop_index, online, set_lock_timeout

revision = "a9d4c6e2f8b1"
down_revision = "c9e2b4d6f8a1"
branch_labels = None
depends_on = None
supabase_slug = "queues_caps_pauses"
phase = "expand"

PLACED = "status = 'queued' AND turn IS NOT NULL"
DUE = "status = 'queued' AND turn IS NULL AND NOT held"
HELD = "status = 'queued' AND held"
QUEUE_COMMENT = "Queue (worker pool) the job runs in"
HELD_COMMENT = "Set aside by the placer: a cap of its scope is full, or it is paused"

LAST_TURN = "heimdex_private.job_last_turn"
LAST_TURN_ARGS = "(uuid, varchar, integer, bigint)"
QUEUE_CLOCK = "heimdex_private.job_queue_clock"
QUEUE_CLOCK_ARGS = "(varchar, integer, bigint)"
# Both as `job_last_turn` was made in decbcd73cdc7: the settings keep each probe on its index
# whatever the statistics say (one backward index-only scan; one forward).
PROBE_SETTINGS = """
    LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY INVOKER
    SET search_path = ''
    SET enable_bitmapscan = off
    SET enable_seqscan = off
    SET enable_incremental_sort = off
    SET enable_sort = off"""
ROOM = "heimdex_private.job_limit_room"
FUNCTIONS = {
    f"{ROOM}()": (
        f"""
CREATE OR REPLACE FUNCTION {ROOM}() RETURNS boolean{PROBE_SETTINGS}
AS $fn$
BEGIN
    -- `used < max_running` matches the partial index; the room to wake is
    -- `scopes.ROOM_TO_WAKE` (a quarter of the cap, at least one slot, at most a placing batch).
    RETURN EXISTS (SELECT FROM public.job_limit AS l
                    WHERE l.waiting AND l.used < l.max_running
                      AND l.max_running - l.used >= greatest(1, least(100, l.max_running / 4)));
END
$fn$""",
        "Whether a capped scope whose held jobs wait has room again: one probe",
    ),
    f"{LAST_TURN}{LAST_TURN_ARGS}": (
        f"""
CREATE OR REPLACE FUNCTION {LAST_TURN}(org uuid, q varchar, prio integer, floor bigint)
    RETURNS bigint{PROBE_SETTINGS}
AS $fn$
BEGIN
    RETURN (SELECT j.turn FROM public.job AS j
             WHERE j.status = 'queued' AND j.turn IS NOT NULL
               AND j.org_id = org AND j.queue = q AND j.priority = prio AND j.turn >= floor
             ORDER BY j.turn DESC, j.id DESC
             LIMIT 1);
END
$fn$""",
        "Last placed turn of an org in a queue at a priority, if at or after floor: one probe",
    ),
    f"{QUEUE_CLOCK}{QUEUE_CLOCK_ARGS}": (
        f"""
CREATE OR REPLACE FUNCTION {QUEUE_CLOCK}(q varchar, prio integer, floor bigint)
    RETURNS bigint{PROBE_SETTINGS}
AS $fn$
BEGIN
    RETURN least((SELECT j.turn FROM public.job AS j
                   WHERE j.status = 'queued' AND j.turn IS NOT NULL
                     AND j.queue = q AND j.priority = prio
                   ORDER BY j.turn
                   LIMIT 1), floor);
END
$fn$""",
        "Where a queue stands at a priority: its lowest placed turn, if below floor; one probe",
    ),
}

TABLES = [
    """
CREATE TABLE job_limit (
    id bigint GENERATED ALWAYS AS IDENTITY,
    org_id uuid,
    queue varchar(100),
    max_running integer,
    weight integer DEFAULT 1 NOT NULL,
    used integer DEFAULT 0 NOT NULL,
    waiting boolean DEFAULT false NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT pk_job_limit PRIMARY KEY (id),
    CONSTRAINT uq_job_limit__org_id_queue UNIQUE NULLS NOT DISTINCT (org_id, queue),
    CONSTRAINT ck_job_limit__scope CHECK (org_id IS NOT NULL OR queue IS NOT NULL),
    CONSTRAINT ck_job_limit__max_running CHECK (max_running IS NULL OR max_running >= 0),
    CONSTRAINT ck_job_limit__weight CHECK (weight BETWEEN 1 AND 1000),
    CONSTRAINT ck_job_limit__used CHECK (used >= 0)
)""",
    """
CREATE TABLE job_pause (
    kind text NOT NULL,
    value varchar(100) NOT NULL,
    actor varchar(200) NOT NULL,
    reason varchar(1000) NOT NULL,
    since timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT pk_job_pause PRIMARY KEY (kind, value),
    CONSTRAINT ck_job_pause__kind CHECK (kind IN ('queue', 'type', 'org'))
)""",
    """
CREATE TABLE job_control_event (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    ts timestamp with time zone DEFAULT now() NOT NULL,
    action varchar(50) NOT NULL,
    scope jsonb NOT NULL,
    actor varchar(200) NOT NULL,
    reason varchar(1000) NOT NULL,
    CONSTRAINT pk_job_control_event PRIMARY KEY (id)
)""",
]
COMMENTS = {
    "TABLE job_limit": "Caps on jobs placed or running per scope, and org weights",
    "COLUMN job_limit.org_id": "Org of the scope (NULL: every org of the queue)",
    "COLUMN job_limit.queue": "Queue of the scope (NULL: every queue of the org)",
    "COLUMN job_limit.max_running": "Most jobs placed or running at once (NULL: no cap)",
    "COLUMN job_limit.weight": "Weight of the org in the fair queue (org rows without a queue)",
    "COLUMN job_limit.used": "Jobs placed or running counted against the cap (a semaphore)",
    "COLUMN job_limit.waiting": "Held jobs wait for a slot of this scope",
    "COLUMN job_limit.updated_at": "Last change of the cap or weight",
    "TABLE job_pause": "Paused queues, job types and orgs: their queued jobs are not claimed",
    "COLUMN job_pause.kind": "queue, type or org",
    "COLUMN job_pause.value": "Name of the queue or type, or the org id",
    "COLUMN job_pause.actor": "Who paused it",
    "COLUMN job_pause.reason": "Why",
    "COLUMN job_pause.since": "When it was paused",
    "TABLE job_control_event": "Audit log of limit and pause changes",
    "COLUMN job_control_event.ts": "When",
    "COLUMN job_control_event.action": "limit_set, limit_unset, paused or resumed",
    "COLUMN job_control_event.scope": "What it applies to, with the values set",
    "COLUMN job_control_event.actor": "Who",
    "COLUMN job_control_event.reason": "Why",
}


def _comment(target: str, text: str) -> str:
    return f"COMMENT ON {target} IS '{text.replace(chr(39), chr(39) * 2)}'"


def upgrade() -> None:
    set_lock_timeout()
    for table in TABLES:
        op.execute(table)
    for target, text in COMMENTS.items():
        op.execute(_comment(target, text))
    # Empty tables created in this transaction: no concurrent build is needed.
    op.execute("CREATE INDEX idx_job_limit__waiting ON job_limit (id) WHERE waiting")
    op.execute(
        "CREATE INDEX idx_job_limit__room ON job_limit (id) WHERE waiting AND used < max_running"
    )
    op.execute("CREATE INDEX idx_job_control_event__ts ON job_control_event (ts)")
    for table in ("job_limit", "job_pause", "job_control_event"):
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"REVOKE ALL ON {table} FROM PUBLIC, anon, authenticated")
    with online():
        ddl(
            [
                "ALTER TABLE job ADD COLUMN IF NOT EXISTS queue varchar(100)"
                " DEFAULT 'default' NOT NULL",
                "ALTER TABLE job ADD COLUMN IF NOT EXISTS held boolean DEFAULT false NOT NULL",
                _comment("COLUMN job.queue", QUEUE_COMMENT),
                _comment("COLUMN job.held", HELD_COMMENT),
            ],
            label="add job.queue and job.held",
        )
        create_index(
            "idx_job__claim_queue", "job", "(queue, priority DESC, turn, run_at)", where=PLACED
        )
        create_index("idx_job__due", "job", "(run_at)", where=DUE)
        create_index("idx_job__held_org", "job", "(org_id, run_at)", where=HELD)
        create_index("idx_job__held_queue", "job", "(queue, run_at)", where=HELD)
        create_index(
            "idx_job__org_queue_turn", "job", "(org_id, queue, priority, turn, id)", where=PLACED
        )
        for name, (function, comment) in FUNCTIONS.items():
            op.execute(function)
            op.execute(_comment(f"FUNCTION {name}", comment))
        drop_index("idx_job__claim_order")
        drop_index("idx_job__unplaced")
        drop_index("idx_job__org_turn")


def downgrade() -> None:
    set_lock_timeout()
    with online():
        create_index("idx_job__org_turn", "job", "(org_id, priority, turn, id)", where=PLACED)
        create_index("idx_job__claim_order", "job", "(priority DESC, turn, run_at)", where=PLACED)
        create_index(
            "idx_job__unplaced", "job", "(run_at)", where="status = 'queued' AND turn IS NULL"
        )
        drop_index("idx_job__held_queue")
        drop_index("idx_job__held_org")
        drop_index("idx_job__due")
        drop_index("idx_job__claim_queue")
        drop_index("idx_job__org_queue_turn")
        for name in FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {name}")
        ddl(
            [
                "DROP TABLE IF EXISTS job_control_event",
                "DROP TABLE IF EXISTS job_pause",
                "DROP TABLE IF EXISTS job_limit",
                # Held jobs go back to the queue, unplaced: the previous release places them.
                "ALTER TABLE job DROP COLUMN IF EXISTS held",
                "ALTER TABLE job DROP COLUMN IF EXISTS queue",
            ],
            label="drop queues, caps and pauses",
        )
