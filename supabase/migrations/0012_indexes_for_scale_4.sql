BEGIN;

UPDATE heimdex_private.alembic_version SET version_num='d5f1a9c3e7b2' WHERE heimdex_private.alembic_version.version_num = 'b8e2d4f6a1c3';

COMMIT;

