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

-- Running upgrade e4a7c2b9d5f1 -> decbcd73cdc7

SET LOCAL lock_timeout = '5s';

CREATE OR REPLACE FUNCTION heimdex_private.job_last_turn(org uuid, prio integer, floor bigint) RETURNS bigint
    LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY INVOKER
    SET search_path = ''
    SET enable_bitmapscan = off
    SET enable_seqscan = off
    SET enable_incremental_sort = off
    SET enable_sort = off
AS $fn$
BEGIN
    RETURN (SELECT j.turn FROM public.job AS j
             WHERE j.status = 'queued' AND j.turn IS NOT NULL
               AND j.org_id = org AND j.priority = prio AND j.turn >= floor
             ORDER BY j.turn DESC, j.id DESC
             LIMIT 1);
END
$fn$;

UPDATE heimdex_private.alembic_version SET version_num='decbcd73cdc7' WHERE heimdex_private.alembic_version.version_num = 'e4a7c2b9d5f1';

COMMIT;

