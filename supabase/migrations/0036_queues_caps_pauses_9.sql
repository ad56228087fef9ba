COMMENT ON FUNCTION heimdex_private.job_limit_room() IS 'Whether a capped scope whose held jobs wait has room again: one probe';

