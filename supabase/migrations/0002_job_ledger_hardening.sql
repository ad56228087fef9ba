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

-- Running upgrade 001_job_ledger_init -> 3af4686817cc

SET LOCAL lock_timeout = '5s';

DO $check$
DECLARE
    unknown text;
BEGIN
    SELECT string_agg(quote_literal(status) || ' (' || n || ' rows)', ', ' ORDER BY status)
      INTO unknown
      FROM (SELECT status, count(*) AS n FROM job
             WHERE status NOT IN ('queued', 'running', 'succeeded', 'failed', 'canceled', 'dead_letter', 'pending', 'processing', 'completed') GROUP BY status) AS s;
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION USING
            MESSAGE = 'job holds status values 3af4686817cc cannot map: ' || unknown,
            HINT = 'set them to one of queued, running, succeeded, failed, canceled, dead_letter and upgrade again; '
                   'nothing was changed';
    END IF;
END
$check$;

CREATE TYPE job_status AS ENUM ('queued', 'running', 'succeeded', 'failed', 'canceled', 'dead_letter');

CREATE TYPE job_backoff_policy AS ENUM ('none', 'fixed', 'exp');

WITH bad AS (
    SELECT id, status, finished_at, last_error_code, last_error_message
      FROM job
     WHERE status IN ('pending', 'processing', 'completed')
        OR (CASE status WHEN 'pending' THEN 'queued' WHEN 'processing' THEN 'running' WHEN 'completed' THEN 'succeeded' ELSE status END IN ('succeeded', 'failed', 'canceled', 'dead_letter') AND finished_at IS NULL)
        OR (CASE status WHEN 'pending' THEN 'queued' WHEN 'processing' THEN 'running' WHEN 'completed' THEN 'succeeded' ELSE status END IN ('queued', 'running') AND finished_at IS NOT NULL)
        OR length(last_error_code) > 64
        OR length(last_error_message) > 2048
       FOR UPDATE
), fixed AS (
    UPDATE job AS j
       SET status = CASE j.status WHEN 'pending' THEN 'queued' WHEN 'processing' THEN 'running' WHEN 'completed' THEN 'succeeded' ELSE j.status END,
           finished_at = CASE
               WHEN CASE j.status WHEN 'pending' THEN 'queued' WHEN 'processing' THEN 'running' WHEN 'completed' THEN 'succeeded' ELSE j.status END IN ('succeeded', 'failed', 'canceled', 'dead_letter')
               THEN coalesce(j.finished_at, j.updated_at, j.started_at, j.created_at)
           END,
           last_error_code = left(j.last_error_code, 64),
           last_error_message = left(j.last_error_message, 2048)
      FROM bad
     WHERE j.id = bad.id
 RETURNING j.id, j.status AS new_status, j.finished_at AS new_finished_at,
           bad.status AS old_status, bad.finished_at AS old_finished_at,
           bad.last_error_code AS old_code, bad.last_error_message AS old_message
)
INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
SELECT id, clock_timestamp(), old_status, new_status,
       jsonb_build_object(
           'action', 'migration.normalized',
           'revision', '3af4686817cc',
           'original',
           CASE WHEN old_status IS DISTINCT FROM new_status
                THEN jsonb_build_object('status', old_status) ELSE '{}'::jsonb END
        || CASE WHEN old_finished_at IS DISTINCT FROM new_finished_at
                THEN jsonb_build_object('finished_at', old_finished_at) ELSE '{}'::jsonb END
        || CASE WHEN length(old_code) > 64
                THEN jsonb_build_object('last_error_code', old_code) ELSE '{}'::jsonb END
        || CASE WHEN length(old_message) > 2048
                THEN jsonb_build_object('last_error_message', old_message) ELSE '{}'::jsonb END)
  FROM fixed;

DROP INDEX idx_job_org_status;

DROP INDEX idx_job_type_status;

ALTER TABLE job
    DROP CONSTRAINT IF EXISTS ck_job_status,
    ALTER COLUMN status DROP DEFAULT,
    ALTER COLUMN status TYPE job_status USING status::job_status,
    ALTER COLUMN status SET DEFAULT 'queued',
    ALTER COLUMN last_error_code TYPE varchar(64),
    ALTER COLUMN last_error_message TYPE varchar(2048),
    ADD COLUMN max_attempts integer DEFAULT 5 NOT NULL,
    ADD COLUMN backoff_policy job_backoff_policy DEFAULT 'exp' NOT NULL,
    ADD CONSTRAINT ck_job__status_finished_at_consistency CHECK ((status IN ('succeeded', 'failed', 'canceled', 'dead_letter') AND finished_at IS NOT NULL) OR (status IN ('queued', 'running') AND finished_at IS NULL));

COMMENT ON COLUMN job.max_attempts IS 'Maximum retry attempts before dead-lettering';

COMMENT ON COLUMN job.backoff_policy IS 'Backoff policy for retry scheduling';

ALTER INDEX uq_job_org_idempotency RENAME TO idx_job__org_id_idempotency_key;

ALTER INDEX idx_job_event_job_ts RENAME TO idx_job_event__job_id_ts;

ALTER INDEX idx_job_event_ts RENAME TO idx_job_event__ts;

ALTER TABLE job_event RENAME CONSTRAINT fk_job_event_job_id TO fk_job_event__job_id__job;

CREATE INDEX idx_job__org_id_created_at_desc ON job (org_id, created_at DESC);

CREATE INDEX idx_job__status_created_at ON job (status, created_at);

UPDATE heimdex_private.alembic_version SET version_num='3af4686817cc' WHERE heimdex_private.alembic_version.version_num = '001_job_ledger_init';

COMMIT;

