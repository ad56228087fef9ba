BEGIN;

UPDATE heimdex_private.alembic_version SET version_num='3af4686817cc' WHERE heimdex_private.alembic_version.version_num = '001_job_ledger_init';

COMMIT;

