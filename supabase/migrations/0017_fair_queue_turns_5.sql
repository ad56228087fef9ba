CREATE INDEX CONCURRENTLY idx_job__claim_order ON job (priority DESC, turn, run_at) WHERE status = 'queued' AND turn IS NOT NULL;

