BEGIN;

UPDATE heimdex_private.alembic_version SET version_num='a9c4e2f7b1d3' WHERE heimdex_private.alembic_version.version_num = 'f3c1a8e5b7d9';

COMMIT;

