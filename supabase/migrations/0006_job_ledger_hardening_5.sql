CREATE INDEX CONCURRENTLY idx_job__status_created_at ON job (status_new, created_at);

