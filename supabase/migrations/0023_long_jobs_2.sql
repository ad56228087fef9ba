DO $ddl$
BEGIN
    SET LOCAL lock_timeout = '5s';
    ALTER TABLE job ADD COLUMN IF NOT EXISTS timeout_seconds integer, ADD COLUMN IF NOT EXISTS checkpoint jsonb;
    COMMENT ON COLUMN job.timeout_seconds IS 'Execution timeout of each attempt in seconds, lower than its job type timeout';
    COMMENT ON COLUMN job.checkpoint IS 'Stage, progress and state saved by the handler; the next attempt resumes';
END
$ddl$;

