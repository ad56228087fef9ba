BEGIN;

UPDATE heimdex_private.alembic_version SET version_num='a9c4e2f7b1d3' WHERE heimdex_private.alembic_version.version_num = 'a9d4c6e2f8b1';

COMMIT;

