-- The reader's role: least privilege. REPLICATION (to open a replication connection, create the
-- slot and stream) plus SELECT on the published tables (snapshots read them). Not a superuser,
-- not the tables' owner. Run as a superuser (REPLICATION can only be granted by one), after
-- schema.sql. Set its password separately, so that this file holds no secret:
--
--   psql -v ON_ERROR_STOP=1 -d topclients -f sql/roles.sql
--   psql -d topclients -c "ALTER ROLE cdc_reader PASSWORD '…'"
--
-- Because the role does not own the tables it cannot create the publication; publication.sql
-- creates it as the owner (the reader then only checks it).

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cdc_reader') THEN
        CREATE ROLE cdc_reader WITH LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE;
    ELSE
        ALTER ROLE cdc_reader WITH LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO cdc_reader;
GRANT SELECT ON public.sellers, public.top_clients TO cdc_reader;
