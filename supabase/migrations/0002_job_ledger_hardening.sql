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

COMMIT;

