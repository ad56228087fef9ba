CREATE INDEX CONCURRENTLY idx_job__org_id_created_at_desc ON job (org_id, created_at DESC);

