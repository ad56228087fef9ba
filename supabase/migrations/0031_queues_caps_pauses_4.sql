CREATE INDEX CONCURRENTLY idx_job__due ON job (run_at) WHERE status = 'queued' AND turn IS NULL AND NOT held;

