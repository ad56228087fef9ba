CREATE OR REPLACE FUNCTION heimdex_private.job_queue_clock(q varchar, prio integer, floor bigint)
    RETURNS bigint
    LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY INVOKER
    SET search_path = ''
    SET enable_bitmapscan = off
    SET enable_seqscan = off
    SET enable_incremental_sort = off
    SET enable_sort = off
AS $fn$
BEGIN
    RETURN least((SELECT j.turn FROM public.job AS j
                   WHERE j.status = 'queued' AND j.turn IS NOT NULL
                     AND j.queue = q AND j.priority = prio
                   ORDER BY j.turn
                   LIMIT 1), floor);
END
$fn$;

