-- The Top Clients service's own database: sellers and the clients each seller shows off.
-- This is the legacy write service's schema; nothing in it knows about change data capture
-- (no outbox table, no triggers). Run it as the role that owns the service's tables.
--
--   psql -v ON_ERROR_STOP=1 -d topclients -f sql/schema.sql

CREATE TABLE IF NOT EXISTS sellers (
    id           bigint PRIMARY KEY,
    username     text NOT NULL UNIQUE,
    display_name text NOT NULL,
    country      text,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- A seller's top clients, in the order the seller chose (position 1 first).
CREATE TABLE IF NOT EXISTS top_clients (
    seller_id   bigint NOT NULL REFERENCES sellers (id) ON DELETE CASCADE,
    client_id   bigint NOT NULL,                  -- the client's account id
    position    int    NOT NULL CHECK (position >= 1),
    name        text   NOT NULL,
    logo_url    text,
    industry    text,
    -- A long text (a few kB): stored out of line by TOAST, so updates that don't touch it
    -- reach logical replication as "unchanged TOAST" and the view agents keep the old value.
    description text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (seller_id, client_id)
);

-- EXTERNAL: out of line and uncompressed once a row passes ~2 kB, whatever the text looks like.
ALTER TABLE top_clients ALTER COLUMN description SET STORAGE EXTERNAL;
