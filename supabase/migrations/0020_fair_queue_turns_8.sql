DROP INDEX CONCURRENTLY IF EXISTS idx_job__queued_claim;

