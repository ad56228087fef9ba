"""Realistic rows for `heimdex db verify`, per revision: the data each revision must carry.

`SEEDS[rev]` is inserted while the database is at `rev` (`None`: before the first revision),
just before the next revision is applied and again before `rev` is downgraded. A revision may
also declare its own `seed_sql = [...]` (statements valid at that revision). The rows include
what production holds and the migrations must survive: upstream's pre-ledger `jobs` table,
legacy status names, terminal rows without `finished_at`, over-long error texts.
"""

from __future__ import annotations

from alembic.script import Script

LEGACY_JOBS_TABLE = """
CREATE TABLE IF NOT EXISTS public.jobs (
    id uuid PRIMARY KEY,
    status varchar(20) NOT NULL,
    stage varchar(50),
    progress integer DEFAULT 0,
    result jsonb,
    error text,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_jobs_status ON public.jobs (status);
CREATE INDEX IF NOT EXISTS idx_jobs_created_at ON public.jobs (created_at DESC)
"""

SEEDS: dict[str | None, list[str]] = {
    None: [
        LEGACY_JOBS_TABLE,
        """
INSERT INTO public.jobs (id, status, stage, progress, result, error, created_at, updated_at)
SELECT gen_random_uuid(), s.status, 'ingest', s.progress, s.result, s.error,
       now() - interval '3 days', s.updated_at
  FROM (VALUES ('pending', 0, NULL::jsonb, NULL, now() - interval '3 days'),
               ('processing', 40, NULL, NULL, now() - interval '2 days'),
               ('completed', 100, '{"frames": 12}'::jsonb, NULL, now() - interval '1 day'),
               ('failed', 70, NULL, 'ffmpeg exited with 1', NULL::timestamptz))
       AS s(status, progress, result, error, updated_at)
""",
    ],
    "001_job_ledger_init": [
        """
INSERT INTO job (org_id, type, status, attempt, idempotency_key, requested_by, created_at,
                 updated_at, started_at, finished_at, last_error_code, last_error_message)
VALUES
  ('11111111-1111-1111-1111-111111111111', 'drive_ingest', 'succeeded', 1, 'seed-1', 'svc',
   now() - interval '2 hours', now() - interval '1 hour', now() - interval '2 hours',
   NULL, NULL, NULL),
  ('11111111-1111-1111-1111-111111111111', 'drive_ingest', 'queued', 0, NULL, NULL,
   now(), now(), NULL, now(), NULL, NULL),
  ('22222222-2222-2222-2222-222222222222', 'mock_process', 'failed', 3, 'seed-2', 'user:7',
   now() - interval '1 day', now() - interval '1 day', now() - interval '1 day',
   now() - interval '1 day', repeat('E', 100), repeat('stack frame ', 300)),
  ('22222222-2222-2222-2222-222222222222', 'mock_process', 'running', 1, NULL, NULL,
   now(), now(), now(), NULL, NULL, NULL)
""",
        """
INSERT INTO job_event (job_id, prev_status, next_status, detail_json)
SELECT id, NULL, status, jsonb_build_object('action', 'seed') FROM job
""",
    ],
    "3af4686817cc": [
        """
INSERT INTO job (org_id, type, status, attempt, max_attempts, backoff_policy, created_at,
                 updated_at, finished_at, last_error_code)
VALUES
  ('33333333-3333-3333-3333-333333333333', 'drive_ingest', 'dead_letter', 9, 9, 'fixed',
   now(), now(), now(), 'TIMEOUT'),
  ('33333333-3333-3333-3333-333333333333', 'drive_ingest', 'canceled', 0, 5, 'none',
   now(), now(), now(), NULL),
  ('33333333-3333-3333-3333-333333333333', 'mock_process', 'queued', 0, 5, 'exp',
   now(), now(), NULL, NULL)
""",
    ],
    # What the API and workers write: submitted params and fingerprints, a leased running job
    # mid-stage, a cancel asked while running, a result; outbox messages pending (one retried,
    # one deferred) and sent. The downgrade must keep the non-default values in job_event.
    "4c2f9a1e7b3d": [
        """
INSERT INTO job (org_id, type, status, attempt, params, request_fingerprint, stage, progress,
                 result, cancel_requested, lease_token, leased_by, lease_expires_at,
                 heartbeat_at, idempotency_key, started_at, finished_at)
VALUES
  ('44444444-4444-4444-4444-444444444444', 'drive_ingest', 'running', 1,
   '{"folder": "f-1", "depth": 2}', repeat('a', 64), 'download', 40, NULL, true,
   gen_random_uuid(), 'worker-1:123', now() + interval '30 seconds', now(), 'seed-4c2f-1',
   now() - interval '1 minute', NULL),
  ('44444444-4444-4444-4444-444444444444', 'mock_process', 'succeeded', 1,
   '{"n": 3}', repeat('b', 64), 'done', 100, '{"frames": 3}', false,
   NULL, NULL, NULL, NULL, 'seed-4c2f-2', now() - interval '5 minutes', now()),
  ('44444444-4444-4444-4444-444444444444', 'mock_process', 'queued', 0,
   '{}', NULL, NULL, 0, NULL, false, NULL, NULL, NULL, NULL, NULL, NULL, NULL)
""",
        """
INSERT INTO job_outbox (job_id, queue_name, deliver_after, sent_at, publish_attempts, last_error)
SELECT id, 'default', now() + interval '10 seconds', NULL, 2, 'connection refused'
  FROM job WHERE idempotency_key = 'seed-4c2f-1'
UNION ALL
SELECT id, 'default', now(), now(), 0, NULL FROM job WHERE idempotency_key = 'seed-4c2f-2'
UNION ALL
SELECT id, 'media', now(), NULL, 0, NULL
  FROM job WHERE org_id = '44444444-4444-4444-4444-444444444444' AND status = 'queued'
""",
    ],
    # Rows written as the table owner (the backend), which RLS must not get in the way of.
    "7e5b3c8d1f20": [
        """
INSERT INTO job (org_id, type, status, params, request_fingerprint)
VALUES ('55555555-5555-5555-5555-555555555555', 'drive_ingest', 'queued', '{"folder": "f-5"}',
        repeat('c', 64))
""",
        """
INSERT INTO job_event (job_id, prev_status, next_status, detail_json)
SELECT id, NULL, 'queued', jsonb_build_object('action', 'seed')
  FROM job WHERE org_id = '55555555-5555-5555-5555-555555555555'
""",
        """
INSERT INTO job_outbox (job_id)
SELECT id FROM job WHERE org_id = '55555555-5555-5555-5555-555555555555'
""",
    ],
    # The queue in the ledger: a job scheduled for later at a high priority, a retry waiting out
    # its backoff, and a running job holding a lease. The downgrade turns the queued ones back
    # into outbox messages due at their run_at.
    "b8e2d4f6a1c3": [
        """
INSERT INTO job (org_id, type, status, priority, run_at, attempt, last_error_code,
                 lease_token, leased_by, lease_expires_at, started_at)
VALUES
  ('66666666-6666-6666-6666-666666666666', 'drive_ingest', 'queued', 7,
   now() + interval '1 day', 0, NULL, NULL, NULL, NULL, NULL),
  ('66666666-6666-6666-6666-666666666666', 'mock_process', 'queued', 0,
   now() + interval '30 seconds', 2, 'MOCK_STAGE_FAILED', NULL, NULL, NULL, now()),
  ('66666666-6666-6666-6666-666666666666', 'noop', 'running', 0,
   now() - interval '1 minute', 0, NULL, gen_random_uuid(), 'worker-9:42',
   now() + interval '30 seconds', now())
""",
    ],
}


def seeds_for(script: Script | None) -> list[str]:
    """The statements to run while the database is at `script` (None: empty database)."""
    if script is None:
        return list(SEEDS[None])
    declared = getattr(script.module, "seed_sql", None)
    own = list(declared) if isinstance(declared, list | tuple) else []
    return [*SEEDS.get(script.revision, []), *own]
