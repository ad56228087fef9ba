CREATE INDEX CONCURRENTLY idx_job__queued_claim ON job (org_id, priority DESC, run_at) WHERE status = 'queued';

