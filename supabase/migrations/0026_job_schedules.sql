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

-- Running upgrade decbcd73cdc7 -> f3c1a8e5b7d9

SET LOCAL lock_timeout = '5s';

CREATE TABLE job_schedule (
    org_id uuid NOT NULL,
    name varchar(100) NOT NULL,
    type varchar(100) NOT NULL,
    params jsonb DEFAULT '{}'::jsonb NOT NULL,
    cron varchar(200) NOT NULL,
    declared boolean DEFAULT false NOT NULL,
    paused boolean DEFAULT false NOT NULL,
    next_fire_at timestamp with time zone NOT NULL,
    last_fire_at timestamp with time zone,
    last_job_id uuid,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT pk_job_schedule PRIMARY KEY (org_id, name)
);

COMMENT ON TABLE job_schedule IS 'Periodic schedules: each fire time becomes one job';

COMMENT ON COLUMN job_schedule.org_id IS 'Organization the schedule''s jobs belong to';

COMMENT ON COLUMN job_schedule.name IS 'Schedule name, unique per org';

COMMENT ON COLUMN job_schedule.type IS 'Job type each fire submits';

COMMENT ON COLUMN job_schedule.params IS 'Params of each submitted job';

COMMENT ON COLUMN job_schedule.cron IS 'Cron expression (five fields, UTC)';

COMMENT ON COLUMN job_schedule.declared IS 'Declared by a job type (workers keep it in step) rather than added per org';

COMMENT ON COLUMN job_schedule.paused IS 'A paused schedule does not fire; resuming skips the fire times it missed';

COMMENT ON COLUMN job_schedule.next_fire_at IS 'Next fire time';

COMMENT ON COLUMN job_schedule.last_fire_at IS 'Fire time of the last job submitted';

COMMENT ON COLUMN job_schedule.last_job_id IS 'Last job submitted (not a foreign key: retention may delete it)';

COMMENT ON COLUMN job_schedule.created_at IS 'Schedule creation timestamp';

COMMENT ON COLUMN job_schedule.updated_at IS 'Last modification timestamp';

CREATE INDEX idx_job_schedule__next_fire_at ON job_schedule (next_fire_at) WHERE NOT paused;

ALTER TABLE job_schedule ENABLE ROW LEVEL SECURITY;

REVOKE ALL ON job_schedule FROM PUBLIC, anon, authenticated;

UPDATE heimdex_private.alembic_version SET version_num='f3c1a8e5b7d9' WHERE heimdex_private.alembic_version.version_num = 'decbcd73cdc7';

COMMIT;

