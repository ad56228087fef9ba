DO $ddl$
BEGIN
    SET LOCAL lock_timeout = '5s';
    ALTER TABLE job SET (fillfactor = 75);
END
$ddl$;

