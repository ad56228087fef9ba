CREATE INDEX CONCURRENTLY idx_job__status_finished_at_id ON job (status, finished_at, id) WHERE status IN ('succeeded', 'failed', 'canceled', 'dead_letter');

