BEGIN;

UPDATE heimdex_private.alembic_version SET version_num='a9d4c6e2f8b1' WHERE heimdex_private.alembic_version.version_num = 'c9e2b4d6f8a1';

COMMIT;

