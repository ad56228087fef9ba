DO $ddl$
BEGIN
    SET LOCAL lock_timeout = '5s';
    IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'job'::regclass
                  AND attname = 'status_new' AND NOT attisdropped) THEN
        LOCK TABLE job IN ACCESS EXCLUSIVE MODE;
        DROP TRIGGER IF EXISTS job__3af4686817cc_mirror ON job;
        DROP TRIGGER IF EXISTS job__3af4686817cc_mirror_update ON job;
        EXECUTE 'COMMENT ON COLUMN job.status_new IS ' || quote_nullable(col_description('job'::regclass, (SELECT attnum FROM pg_attribute WHERE attrelid = 'job'::regclass AND attname = 'status')));
        EXECUTE 'COMMENT ON COLUMN job.last_error_code_new IS ' || quote_nullable(col_description('job'::regclass, (SELECT attnum FROM pg_attribute WHERE attrelid = 'job'::regclass AND attname = 'last_error_code')));
        EXECUTE 'COMMENT ON COLUMN job.last_error_message_new IS ' || quote_nullable(col_description('job'::regclass, (SELECT attnum FROM pg_attribute WHERE attrelid = 'job'::regclass AND attname = 'last_error_message')));
        ALTER TABLE job
            DROP CONSTRAINT IF EXISTS ck_job_status,
            DROP COLUMN status,
            DROP COLUMN last_error_code,
            DROP COLUMN last_error_message;
        -- SET NOT NULL skips its scan: the validated CHECK proves it (then goes).
        ALTER TABLE job ALTER COLUMN status_new SET NOT NULL;
        ALTER TABLE job DROP CONSTRAINT ck_job__status_new_not_null;
        ALTER TABLE job ALTER COLUMN status_new SET DEFAULT 'queued';
        ALTER TABLE job RENAME COLUMN status_new TO status;
        ALTER TABLE job RENAME COLUMN last_error_code_new TO last_error_code;
        ALTER TABLE job RENAME COLUMN last_error_message_new TO last_error_message;
        DROP FUNCTION IF EXISTS job__3af4686817cc_mirror();
    END IF;
    IF to_regclass('public.uq_job_org_idempotency') IS NOT NULL THEN
        ALTER INDEX uq_job_org_idempotency RENAME TO idx_job__org_id_idempotency_key;
    END IF;
    IF to_regclass('public.idx_job_event_job_ts') IS NOT NULL THEN
        ALTER INDEX idx_job_event_job_ts RENAME TO idx_job_event__job_id_ts;
    END IF;
    IF to_regclass('public.idx_job_event_ts') IS NOT NULL THEN
        ALTER INDEX idx_job_event_ts RENAME TO idx_job_event__ts;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'fk_job_event_job_id') THEN
        ALTER TABLE job_event RENAME CONSTRAINT fk_job_event_job_id TO fk_job_event__job_id__job;
    END IF;
    COMMENT ON COLUMN job.max_attempts IS 'Maximum retry attempts before dead-lettering';
    COMMENT ON COLUMN job.backoff_policy IS 'Backoff policy for retry scheduling';
END
$ddl$;

