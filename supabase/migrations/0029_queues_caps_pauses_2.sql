DO $ddl$
BEGIN
    SET LOCAL lock_timeout = '5s';
    ALTER TABLE job ADD COLUMN IF NOT EXISTS queue varchar(100) DEFAULT 'default' NOT NULL;
    ALTER TABLE job ADD COLUMN IF NOT EXISTS held boolean DEFAULT false NOT NULL;
    COMMENT ON COLUMN job.queue IS 'Queue (worker pool) the job runs in';
    COMMENT ON COLUMN job.held IS 'Set aside by the placer: a cap of its scope is full, or it is paused';
END
$ddl$;

