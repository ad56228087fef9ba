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

-- Running upgrade f3c1a8e5b7d9 -> c9e2b4d6f8a1

SET LOCAL lock_timeout = '5s';

CREATE TABLE job_backfill (
    name varchar(100) NOT NULL,
    revision varchar(64) NOT NULL,
    table_name varchar(200) NOT NULL,
    key_column varchar(63) NOT NULL,
    batch_sql text NOT NULL,
    batch_size integer NOT NULL,
    rows_per_second double precision,
    pause_factor double precision,
    estimated_rows bigint DEFAULT 0 NOT NULL,
    rows_done bigint DEFAULT 0 NOT NULL,
    batches_done integer DEFAULT 0 NOT NULL,
    last_key text,
    paused_seconds double precision DEFAULT 0 NOT NULL,
    job_id uuid,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    started_at timestamp with time zone,
    finished_at timestamp with time zone,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT pk_job_backfill PRIMARY KEY (name),
    CONSTRAINT ck_job_backfill__batch_size_positive CHECK (batch_size > 0),
    CONSTRAINT ck_job_backfill__throttle_positive
        CHECK (coalesce(rows_per_second, 1) > 0 AND coalesce(pause_factor, 0) >= 0)
);

COMMENT ON TABLE job_backfill IS 'Backfills handed to the ledger by data revisions, with their progress';

COMMENT ON COLUMN job_backfill.name IS 'Backfill name, unique';

COMMENT ON COLUMN job_backfill.revision IS 'Revision that recorded the backfill';

COMMENT ON COLUMN job_backfill.table_name IS 'Table the batches walk';

COMMENT ON COLUMN job_backfill.key_column IS 'Unique column the batches walk in order';

COMMENT ON COLUMN job_backfill.batch_sql IS 'Statement run per batch, over the keys lo to hi (bind parameters)';

COMMENT ON COLUMN job_backfill.batch_size IS 'Keys per batch';

COMMENT ON COLUMN job_backfill.rows_per_second IS 'Throttle: pause after each batch so the rate stays under this (NULL: none)';

COMMENT ON COLUMN job_backfill.pause_factor IS 'Throttle: pause this many times each batch''s duration (NULL: none)';

COMMENT ON COLUMN job_backfill.estimated_rows IS 'Rows in the table when the backfill was recorded (an estimate)';

COMMENT ON COLUMN job_backfill.rows_done IS 'Rows (keys) the batches done so far covered';

COMMENT ON COLUMN job_backfill.batches_done IS 'Batches done';

COMMENT ON COLUMN job_backfill.last_key IS 'Last key done, as text (NULL: none yet)';

COMMENT ON COLUMN job_backfill.paused_seconds IS 'Time the throttle paused, in seconds';

COMMENT ON COLUMN job_backfill.job_id IS 'The heimdex.backfill job (not a foreign key: retention may delete it)';

COMMENT ON COLUMN job_backfill.created_at IS 'When the revision recorded the backfill';

COMMENT ON COLUMN job_backfill.started_at IS 'When the first batch ran';

COMMENT ON COLUMN job_backfill.finished_at IS 'When the last batch ran (NULL: not done)';

COMMENT ON COLUMN job_backfill.updated_at IS 'Last progress';

ALTER TABLE job_backfill ENABLE ROW LEVEL SECURITY;

REVOKE ALL ON job_backfill FROM PUBLIC, anon, authenticated;

UPDATE heimdex_private.alembic_version SET version_num='c9e2b4d6f8a1' WHERE heimdex_private.alembic_version.version_num = 'f3c1a8e5b7d9';

COMMIT;

