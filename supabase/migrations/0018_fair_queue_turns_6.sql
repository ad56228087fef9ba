CREATE INDEX CONCURRENTLY idx_job__org_turn ON job (org_id, priority, turn, id) WHERE status = 'queued' AND turn IS NOT NULL;

