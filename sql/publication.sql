-- The publication the reader streams: the tables listed in the reader's `postgres.tables`.
-- Run as the tables' owner (or a superuser), after schema.sql. The reader's `postgres.publication`
-- must name it; a reader whose role owns the tables creates it by itself when it is missing.
--
--   psql -v ON_ERROR_STOP=1 -d topclients -f sql/publication.sql

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'cdc_topclients') THEN
        CREATE PUBLICATION cdc_topclients
            FOR TABLE public.sellers, public.top_clients
            WITH (publish_via_partition_root = true);
    END IF;
END
$$;
