CREATE OR REPLACE FUNCTION heimdex_private.job_limit_room() RETURNS boolean
    LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY INVOKER
    SET search_path = ''
    SET enable_bitmapscan = off
    SET enable_seqscan = off
    SET enable_incremental_sort = off
    SET enable_sort = off
AS $fn$
BEGIN
    -- `used < max_running` matches the partial index; the room to wake is
    -- `scopes.ROOM_TO_WAKE` (a quarter of the cap, at least one slot, at most a placing batch).
    RETURN EXISTS (SELECT FROM public.job_limit AS l
                    WHERE l.waiting AND l.used < l.max_running
                      AND l.max_running - l.used >= greatest(1, least(100, l.max_running / 4)));
END
$fn$;

