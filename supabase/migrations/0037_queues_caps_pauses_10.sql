CREATE OR REPLACE FUNCTION heimdex_private.job_last_turn(org uuid, q varchar, prio integer, floor bigint)
    RETURNS bigint
    LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY INVOKER
    SET search_path = ''
    SET enable_bitmapscan = off
    SET enable_seqscan = off
    SET enable_incremental_sort = off
    SET enable_sort = off
AS $fn$
BEGIN
    RETURN (SELECT j.turn FROM public.job AS j
             WHERE j.status = 'queued' AND j.turn IS NOT NULL
               AND j.org_id = org AND j.queue = q AND j.priority = prio AND j.turn >= floor
             ORDER BY j.turn DESC, j.id DESC
             LIMIT 1);
END
$fn$;

