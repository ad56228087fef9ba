DO $backfill$
DECLARE
    n bigint;
    done bigint := 0;
    lo bigint := 0;
    k bigint;
BEGIN
    SELECT greatest(1, 5000 / greatest(1, (reltuples / greatest(relpages, 1))::bigint)) INTO k
      FROM pg_class WHERE oid = 'job'::regclass;
    LOOP
        EXIT WHEN lo >= pg_relation_size('job') / current_setting('block_size')::bigint;
        WITH batch AS (SELECT id, status, finished_at, updated_at, started_at, created_at, last_error_code, last_error_message FROM job WHERE ctid >= ('(' || lo || ',0)')::tid AND ctid < ('(' || lo + k || ',0)')::tid AND (status_new IS NULL) FOR UPDATE),
fixed AS (
    UPDATE job AS j
       SET status_new = (CASE b.status WHEN 'pending' THEN 'queued' WHEN 'processing' THEN 'running' WHEN 'completed' THEN 'succeeded' ELSE b.status END)::job_status,
           finished_at = CASE
               WHEN CASE b.status WHEN 'pending' THEN 'queued' WHEN 'processing' THEN 'running' WHEN 'completed' THEN 'succeeded' ELSE b.status END IN ('succeeded', 'failed', 'canceled', 'dead_letter')
               THEN coalesce(b.finished_at, b.updated_at, b.started_at, b.created_at)
           END,
           last_error_code_new = left(b.last_error_code, 64),
           last_error_message_new = left(b.last_error_message, 2048)
      FROM batch AS b
     WHERE j.id = b.id
 RETURNING j.id, j.status_new::text AS new_status, j.finished_at AS new_finished_at,
           b.status AS old_status, b.finished_at AS old_finished_at,
           b.last_error_code AS old_code, b.last_error_message AS old_message
), logged AS (
INSERT INTO job_event (job_id, ts, prev_status, next_status, detail_json)
SELECT id, clock_timestamp(), old_status, new_status,
       jsonb_build_object(
           'action', 'migration.normalized',
           'revision', '3af4686817cc',
           'original',
           CASE WHEN old_status IS DISTINCT FROM new_status
                THEN jsonb_build_object('status', old_status) ELSE '{}'::jsonb END
        || CASE WHEN old_finished_at IS DISTINCT FROM new_finished_at
                THEN jsonb_build_object('finished_at', old_finished_at) ELSE '{}'::jsonb END
        || CASE WHEN length(old_code) > 64
                THEN jsonb_build_object('last_error_code', old_code) ELSE '{}'::jsonb END
        || CASE WHEN length(old_message) > 2048
                THEN jsonb_build_object('last_error_message', old_message) ELSE '{}'::jsonb END)
  FROM fixed
 WHERE old_status IS DISTINCT FROM new_status
    OR old_finished_at IS DISTINCT FROM new_finished_at
    OR length(old_code) > 64
    OR length(old_message) > 2048
)
SELECT count(*) FROM batch
          INTO n;
        done := done + n;
        lo := lo + k;
        RAISE NOTICE USING MESSAGE = 'normalise job rows: ' || done || ' rows';
        COMMIT;
    END LOOP;
END
$backfill$;

