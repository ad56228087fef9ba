DO $ddl$
BEGIN
    SET LOCAL lock_timeout = '5s';
    IF to_regtype('public.job_status') IS NULL THEN
        CREATE TYPE job_status AS ENUM ('queued', 'running', 'succeeded', 'failed', 'canceled', 'dead_letter');
    END IF;
    IF to_regtype('public.job_backoff_policy') IS NULL THEN
        CREATE TYPE job_backoff_policy AS ENUM ('none', 'fixed', 'exp');
    END IF;
    ALTER TABLE job ADD COLUMN IF NOT EXISTS status_new job_status, ADD COLUMN IF NOT EXISTS last_error_code_new varchar(64), ADD COLUMN IF NOT EXISTS last_error_message_new varchar(2048), ADD COLUMN IF NOT EXISTS max_attempts integer DEFAULT 5 NOT NULL, ADD COLUMN IF NOT EXISTS backoff_policy job_backoff_policy DEFAULT 'exp' NOT NULL;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'ck_job__status_finished_at_consistency') THEN
        ALTER TABLE job ADD CONSTRAINT ck_job__status_finished_at_consistency CHECK ((status_new IN ('succeeded', 'failed', 'canceled', 'dead_letter') AND finished_at IS NOT NULL) OR (status_new IN ('queued', 'running') AND finished_at IS NULL)) NOT VALID;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'ck_job__status_new_not_null') THEN
        ALTER TABLE job ADD CONSTRAINT ck_job__status_new_not_null CHECK (status_new IS NOT NULL) NOT VALID;
    END IF;
    CREATE OR REPLACE FUNCTION job__3af4686817cc_mirror() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.status_new := (CASE NEW.status WHEN 'pending' THEN 'queued' WHEN 'processing' THEN 'running' WHEN 'completed' THEN 'succeeded' ELSE NEW.status END)::job_status;
        NEW.last_error_code_new := NEW.last_error_code;
        NEW.last_error_message_new := NEW.last_error_message;
    ELSIF OLD.status_new IS NOT NULL THEN
        IF NEW.status IS DISTINCT FROM OLD.status THEN
            NEW.status_new := (CASE NEW.status WHEN 'pending' THEN 'queued' WHEN 'processing' THEN 'running' WHEN 'completed' THEN 'succeeded' ELSE NEW.status END)::job_status;
        END IF;
        IF NEW.last_error_code IS DISTINCT FROM OLD.last_error_code THEN
            NEW.last_error_code_new := NEW.last_error_code;
        END IF;
        IF NEW.last_error_message IS DISTINCT FROM OLD.last_error_message THEN
            NEW.last_error_message_new := NEW.last_error_message;
        END IF;
    END IF;
    RETURN NEW;
END
$fn$;
    CREATE OR REPLACE TRIGGER job__3af4686817cc_mirror BEFORE INSERT ON job FOR EACH ROW EXECUTE FUNCTION job__3af4686817cc_mirror();
    CREATE OR REPLACE TRIGGER job__3af4686817cc_mirror_update BEFORE UPDATE ON job FOR EACH ROW WHEN (OLD.status_new IS NOT NULL) EXECUTE FUNCTION job__3af4686817cc_mirror();
END
$ddl$;

