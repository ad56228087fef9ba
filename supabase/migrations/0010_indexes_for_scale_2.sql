CREATE INDEX CONCURRENTLY idx_job__org_id_status_created_at_id ON job (org_id, status, created_at, id);

