CREATE INDEX CONCURRENTLY idx_job__org_queue_turn ON job (org_id, queue, priority, turn, id) WHERE status = 'queued' AND turn IS NOT NULL;

