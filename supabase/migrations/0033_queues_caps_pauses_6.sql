CREATE INDEX CONCURRENTLY idx_job__held_queue ON job (queue, run_at) WHERE status = 'queued' AND held;

