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

-- Running upgrade 7e5b3c8d1f20 -> b8e2d4f6a1c3

SET LOCAL lock_timeout = '5s';

ALTER TABLE job ADD COLUMN IF NOT EXISTS run_at timestamp with time zone DEFAULT now() NOT NULL;

COMMENT ON COLUMN job.run_at IS 'Due time: a queued job is not claimed before it (scheduling, retry backoff)';

COMMENT ON COLUMN job.priority IS 'Claim order: higher first; within a priority, round-robin across orgs';

DO $fold$
BEGIN
    IF to_regclass('public.job_outbox') IS NULL THEN
        RETURN;
    END IF;
    UPDATE job AS j
       SET run_at = o.due
      FROM (SELECT job_id, min(deliver_after) AS due
              FROM job_outbox
             WHERE sent_at IS NULL
             GROUP BY job_id) AS o
     WHERE j.id = o.job_id AND j.status = 'queued';
    DROP TABLE job_outbox;
END
$fold$;

COMMIT;

