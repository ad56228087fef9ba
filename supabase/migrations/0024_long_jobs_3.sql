BEGIN;

UPDATE heimdex_private.alembic_version SET version_num='e4a7c2b9d5f1' WHERE heimdex_private.alembic_version.version_num = 'd2d60e3ca6c1';

COMMIT;

