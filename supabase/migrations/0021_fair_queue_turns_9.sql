BEGIN;

UPDATE heimdex_private.alembic_version SET version_num='d2d60e3ca6c1' WHERE heimdex_private.alembic_version.version_num = 'd5f1a9c3e7b2';

COMMIT;

