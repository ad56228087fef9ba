COMMENT ON FUNCTION heimdex_private.job_last_turn(uuid, varchar, integer, bigint) IS 'Last placed turn of an org in a queue at a priority, if at or after floor: one probe';

