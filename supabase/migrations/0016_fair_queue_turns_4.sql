COMMENT ON FUNCTION heimdex_private.job_last_turn(uuid, integer, bigint) IS 'Last placed turn of an org at a priority, if at or after floor: one probe';

