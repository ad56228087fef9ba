BEGIN;

UPDATE heimdex_private.alembic_version SET version_num='b8e2d4f6a1c3' WHERE heimdex_private.alembic_version.version_num = '7e5b3c8d1f20';

COMMIT;

