CREATE INDEX CONCURRENTLY idx_job__claim_queue ON job (queue, priority DESC, turn, run_at) WHERE status = 'queued' AND turn IS NOT NULL;

