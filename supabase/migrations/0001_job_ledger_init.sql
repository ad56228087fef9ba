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

CREATE TABLE heimdex_private.alembic_version (
    version_num VARCHAR(32) NOT NULL, 
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);

-- Running upgrade  -> 001_job_ledger_init

SET LOCAL lock_timeout = '5s';

CREATE TABLE job (
    id UUID DEFAULT gen_random_uuid() NOT NULL, 
    org_id UUID NOT NULL, 
    type VARCHAR(100) NOT NULL, 
    status VARCHAR(50) DEFAULT 'queued' NOT NULL, 
    attempt INTEGER DEFAULT 0 NOT NULL, 
    priority INTEGER DEFAULT 0 NOT NULL, 
    idempotency_key VARCHAR(255), 
    requested_by VARCHAR(255), 
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    started_at TIMESTAMP WITH TIME ZONE, 
    finished_at TIMESTAMP WITH TIME ZONE, 
    last_error_code VARCHAR(100), 
    last_error_message TEXT, 
    CONSTRAINT pk_job PRIMARY KEY (id), 
    CONSTRAINT ck_job_status CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled', 'dead_letter'))
);

COMMENT ON TABLE job IS 'Durable ledger for asynchronous jobs with retry and idempotency support';

COMMENT ON COLUMN job.id IS 'Globally unique job identifier';

COMMENT ON COLUMN job.org_id IS 'Organization/tenant identifier for RLS';

COMMENT ON COLUMN job.type IS 'Job type discriminator (e.g., ''mock_process'', ''drive_ingest'')';

COMMENT ON COLUMN job.status IS 'Current job state';

COMMENT ON COLUMN job.attempt IS 'Retry attempt counter (0 = first attempt)';

COMMENT ON COLUMN job.priority IS 'Job priority (higher = more urgent, future use)';

COMMENT ON COLUMN job.idempotency_key IS 'Client-provided key for deduplication';

COMMENT ON COLUMN job.requested_by IS 'User/service that requested the job';

COMMENT ON COLUMN job.created_at IS 'Job creation timestamp';

COMMENT ON COLUMN job.updated_at IS 'Last modification timestamp';

COMMENT ON COLUMN job.started_at IS 'When job execution started';

COMMENT ON COLUMN job.finished_at IS 'When job reached terminal state';

COMMENT ON COLUMN job.last_error_code IS 'Error classification (e.g., ''TIMEOUT'', ''VALIDATION_ERROR'')';

COMMENT ON COLUMN job.last_error_message IS 'Human-readable error detail';

CREATE UNIQUE INDEX uq_job_org_idempotency ON job (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE INDEX idx_job_org_status ON job (org_id, status, created_at);

CREATE INDEX idx_job_type_status ON job (type, status);

CREATE TABLE job_event (
    id UUID DEFAULT gen_random_uuid() NOT NULL, 
    job_id UUID NOT NULL, 
    ts TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    prev_status VARCHAR(50), 
    next_status VARCHAR(50) NOT NULL, 
    detail_json JSONB, 
    CONSTRAINT pk_job_event PRIMARY KEY (id), 
    CONSTRAINT fk_job_event_job_id FOREIGN KEY(job_id) REFERENCES job (id) ON DELETE CASCADE
);

COMMENT ON TABLE job_event IS 'Immutable audit log of job state transitions';

COMMENT ON COLUMN job_event.id IS 'Unique event identifier';

COMMENT ON COLUMN job_event.job_id IS 'Reference to parent job';

COMMENT ON COLUMN job_event.ts IS 'Event occurrence timestamp';

COMMENT ON COLUMN job_event.prev_status IS 'Status before transition (NULL for initial state)';

COMMENT ON COLUMN job_event.next_status IS 'Status after transition';

COMMENT ON COLUMN job_event.detail_json IS 'Additional event metadata (stage, progress, error details)';

CREATE INDEX idx_job_event_job_ts ON job_event (job_id, ts);

CREATE INDEX idx_job_event_ts ON job_event (ts);

DO $legacy$
DECLARE
    unknown text;
BEGIN
    IF to_regclass('public.jobs') IS NULL THEN
        RETURN;
    END IF;
    SELECT string_agg(quote_nullable(status) || ' (' || n || ' rows)', ', ' ORDER BY status)
      INTO unknown
      FROM (SELECT status, count(*) AS n FROM public.jobs
             WHERE status IS NULL OR status NOT IN ('pending', 'processing', 'completed', 'failed') GROUP BY status) AS s;
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION USING
            MESSAGE = 'legacy table jobs holds status values 001_job_ledger_init cannot map: '
                      || unknown,
            HINT = 'map them to pending, processing, completed or failed and upgrade again; '
                   'nothing was changed';
    END IF;
    INSERT INTO job (id, org_id, type, status, created_at, updated_at, finished_at,
                     last_error_message)
    SELECT id, '00000000-0000-0000-0000-000000000000'::uuid, 'legacy', CASE status WHEN 'pending' THEN 'queued' WHEN 'processing' THEN 'running' WHEN 'completed' THEN 'succeeded' WHEN 'failed' THEN 'failed' END,
           coalesce(created_at, now()), coalesce(updated_at, created_at, now()),
           CASE WHEN status IN ('completed', 'failed')
                THEN coalesce(updated_at, created_at, now()) END,
           error
      FROM public.jobs;
    INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
    SELECT j.id, coalesce(j.updated_at, j.created_at, now()), j.status,
           CASE j.status WHEN 'pending' THEN 'queued' WHEN 'processing' THEN 'running' WHEN 'completed' THEN 'succeeded' WHEN 'failed' THEN 'failed' END,
           jsonb_build_object('action', 'migration.legacy_import',
                              'revision', '001_job_ledger_init',
                              'legacy_row', to_jsonb(j))
      FROM public.jobs AS j;
    DROP TABLE public.jobs;
END
$legacy$;

INSERT INTO heimdex_private.alembic_version (version_num) VALUES ('001_job_ledger_init') RETURNING heimdex_private.alembic_version.version_num;

COMMIT;

