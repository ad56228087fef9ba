CREATE INDEX CONCURRENTLY idx_job__held_org ON job (org_id, run_at) WHERE status = 'queued' AND held;

