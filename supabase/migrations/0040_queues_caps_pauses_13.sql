COMMENT ON FUNCTION heimdex_private.job_queue_clock(varchar, integer, bigint) IS 'Where a queue stands at a priority: its lowest placed turn, if below floor; one probe';

