DO $version_table$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'heimdex_private') THEN
        CREATE SCHEMA heimdex_private;
    END IF;
    IF to_regclass('public.alembic_version') IS NULL THEN
        RETURN;
    END IF;
    IF to_regclass('heimdex_private.alembic_version') IS NOT NULL THEN
        RAISE EXCEPTION USING
            MESSAGE = 'both public.alembic_version and heimdex_private.alembic_version '
                      'exist: the revision this database is at is ambiguous',
            HINT = 'keep the one holding the right revision, drop the other, and run again; '
                   'nothing was changed';
    END IF;
    ALTER TABLE public.alembic_version SET SCHEMA heimdex_private;
END
$version_table$;

BEGIN;

-- Running upgrade c9e2b4d6f8a1 -> a9d4c6e2f8b1

SET LOCAL lock_timeout = '5s';

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
);

CREATE TABLE job_pause (
    kind text NOT NULL,
    value varchar(100) NOT NULL,
    actor varchar(200) NOT NULL,
    reason varchar(1000) NOT NULL,
    since timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT pk_job_pause PRIMARY KEY (kind, value),
    CONSTRAINT ck_job_pause__kind CHECK (kind IN ('queue', 'type', 'org'))
);

CREATE TABLE job_control_event (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    ts timestamp with time zone DEFAULT now() NOT NULL,
    action varchar(50) NOT NULL,
    scope jsonb NOT NULL,
    actor varchar(200) NOT NULL,
    reason varchar(1000) NOT NULL,
    CONSTRAINT pk_job_control_event PRIMARY KEY (id)
);

COMMENT ON TABLE job_limit IS 'Caps on jobs placed or running per scope, and org weights';

COMMENT ON COLUMN job_limit.org_id IS 'Org of the scope (NULL: every org of the queue)';

COMMENT ON COLUMN job_limit.queue IS 'Queue of the scope (NULL: every queue of the org)';

COMMENT ON COLUMN job_limit.max_running IS 'Most jobs placed or running at once (NULL: no cap)';

COMMENT ON COLUMN job_limit.weight IS 'Weight of the org in the fair queue (org rows without a queue)';

COMMENT ON COLUMN job_limit.used IS 'Jobs placed or running counted against the cap (a semaphore)';

COMMENT ON COLUMN job_limit.waiting IS 'Held jobs wait for a slot of this scope';

COMMENT ON COLUMN job_limit.updated_at IS 'Last change of the cap or weight';

COMMENT ON TABLE job_pause IS 'Paused queues, job types and orgs: their queued jobs are not claimed';

COMMENT ON COLUMN job_pause.kind IS 'queue, type or org';

COMMENT ON COLUMN job_pause.value IS 'Name of the queue or type, or the org id';

COMMENT ON COLUMN job_pause.actor IS 'Who paused it';

COMMENT ON COLUMN job_pause.reason IS 'Why';

COMMENT ON COLUMN job_pause.since IS 'When it was paused';

COMMENT ON TABLE job_control_event IS 'Audit log of limit and pause changes';

COMMENT ON COLUMN job_control_event.ts IS 'When';

COMMENT ON COLUMN job_control_event.action IS 'limit_set, limit_unset, paused or resumed';

COMMENT ON COLUMN job_control_event.scope IS 'What it applies to, with the values set';

COMMENT ON COLUMN job_control_event.actor IS 'Who';

COMMENT ON COLUMN job_control_event.reason IS 'Why';

CREATE INDEX idx_job_limit__waiting ON job_limit (id) WHERE waiting;

CREATE INDEX idx_job_limit__room ON job_limit (id) WHERE waiting AND used < max_running;

CREATE INDEX idx_job_control_event__ts ON job_control_event (ts);

ALTER TABLE job_limit ENABLE ROW LEVEL SECURITY;

REVOKE ALL ON job_limit FROM PUBLIC, anon, authenticated;

ALTER TABLE job_pause ENABLE ROW LEVEL SECURITY;

REVOKE ALL ON job_pause FROM PUBLIC, anon, authenticated;

ALTER TABLE job_control_event ENABLE ROW LEVEL SECURITY;

REVOKE ALL ON job_control_event FROM PUBLIC, anon, authenticated;

COMMIT;

