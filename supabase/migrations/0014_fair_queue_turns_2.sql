DO $ddl$
BEGIN
    SET LOCAL lock_timeout = '5s';
    ALTER TABLE job ADD COLUMN IF NOT EXISTS turn bigint;
    COMMENT ON COLUMN job.turn IS 'Claim order within a priority (fair queuing across orgs); NULL until placed';
    CREATE SEQUENCE IF NOT EXISTS job_turn_clock MINVALUE 0 START 0;
END
$ddl$;

