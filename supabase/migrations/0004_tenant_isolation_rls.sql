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

-- Running upgrade 4c2f9a1e7b3d -> 7e5b3c8d1f20

SET LOCAL lock_timeout = '5s';

DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r);
        BEGIN
            EXECUTE 'CREATE ROLE ' || quote_ident(r) || ' NOLOGIN';
        EXCEPTION
            -- Roles are cluster-wide: a migration of another database may create it meanwhile.
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION USING
                    MESSAGE = 'role ' || r || ' does not exist and ' || current_user
                              || ' may not create it',
                    HINT = 'create the roles anon, authenticated and service_role (NOLOGIN) '
                           'as a superuser, or grant CREATEROLE to the migrating user, '
                           'and upgrade again; nothing was changed';
        END;
    END LOOP;
END
$roles$;

CREATE SCHEMA IF NOT EXISTS heimdex_private;

CREATE FUNCTION heimdex_private.current_org_id() RETURNS uuid
    LANGUAGE plpgsql STABLE SECURITY INVOKER
    SET search_path = ''
AS $fn$
DECLARE
    claims text := current_setting('request.jwt.claims', true);
BEGIN
    IF claims IS NULL OR claims = '' THEN
        RETURN NULL;
    END IF;
    RETURN (claims::jsonb ->> 'org_id')::uuid;
EXCEPTION
    WHEN data_exception THEN
        RETURN NULL;
END
$fn$;

COMMENT ON FUNCTION heimdex_private.current_org_id() IS 'org_id claim of the request JWT (request.jwt.claims), NULL when missing or malformed';

REVOKE ALL ON FUNCTION heimdex_private.current_org_id() FROM PUBLIC;

GRANT USAGE ON SCHEMA heimdex_private TO authenticated;

GRANT EXECUTE ON FUNCTION heimdex_private.current_org_id() TO authenticated;

ALTER TABLE public.job ENABLE ROW LEVEL SECURITY;

REVOKE ALL ON public.job FROM PUBLIC, anon, authenticated;

ALTER TABLE public.job_event ENABLE ROW LEVEL SECURITY;

REVOKE ALL ON public.job_event FROM PUBLIC, anon, authenticated;

ALTER TABLE public.job_outbox ENABLE ROW LEVEL SECURITY;

REVOKE ALL ON public.job_outbox FROM PUBLIC, anon, authenticated;

GRANT SELECT, INSERT, UPDATE, DELETE ON public.job TO service_role;

GRANT SELECT, INSERT, UPDATE, DELETE ON public.job_event TO service_role;

GRANT SELECT ON public.job, public.job_event TO authenticated;

GRANT INSERT (org_id, type, params, idempotency_key, requested_by) ON public.job TO authenticated;

CREATE POLICY job__authenticated_select ON public.job AS PERMISSIVE FOR SELECT TO authenticated USING (org_id = (SELECT heimdex_private.current_org_id()));

CREATE POLICY job__authenticated_insert ON public.job AS PERMISSIVE FOR INSERT TO authenticated WITH CHECK (org_id = (SELECT heimdex_private.current_org_id()) AND status = 'queued' AND attempt = 0);

CREATE POLICY job__service_role_all ON public.job AS PERMISSIVE FOR ALL TO service_role USING (true) WITH CHECK (true);

CREATE POLICY job_event__authenticated_select ON public.job_event AS PERMISSIVE FOR SELECT TO authenticated USING (EXISTS (SELECT 1 FROM public.job AS j WHERE j.id = job_event.job_id));

CREATE POLICY job_event__service_role_all ON public.job_event AS PERMISSIVE FOR ALL TO service_role USING (true) WITH CHECK (true);

UPDATE heimdex_private.alembic_version SET version_num='7e5b3c8d1f20' WHERE heimdex_private.alembic_version.version_num = '4c2f9a1e7b3d';

COMMIT;

