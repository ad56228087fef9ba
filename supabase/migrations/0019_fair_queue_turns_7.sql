CREATE INDEX CONCURRENTLY idx_job__unplaced ON job (run_at) WHERE status = 'queued' AND turn IS NULL;

