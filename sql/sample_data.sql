-- Demo data: 1,000 sellers; about 40% of them list no top clients (the seed's observation that
-- makes the hybrid "ids only" view pay off), the others 1 to 8, each with a ~3.3 kB description
-- (stored out of line). Deterministic: the same rows on every run. Safe to run twice.
--
--   psql -v ON_ERROR_STOP=1 -d topclients -f sql/sample_data.sql

INSERT INTO sellers (id, username, display_name, country)
SELECT s,
       'seller' || s,
       (ARRAY['Ada', 'Grace', 'Alan', 'Edsger', 'Barbara', 'Donald', 'Frances', 'Ken'])[1 + s % 8]
           || ' ' ||
       (ARRAY['Lovelace', 'Hopper', 'Turing', 'Dijkstra', 'Liskov', 'Knuth', 'Allen', 'Thompson',
              'Ritchie', 'Hamilton'])[1 + (s / 8) % 10],
       (ARRAY['US', 'DE', 'IL', 'IN', 'BR', 'UA', 'PH', 'GB', 'NG', 'FR'])[1 + (s * 7) % 10]
FROM generate_series(1, 1000) AS s
ON CONFLICT (id) DO NOTHING;

INSERT INTO top_clients (seller_id, client_id, position, name, logo_url, industry, description)
SELECT s.id,
       c.client_id,
       c.position,
       (ARRAY['Acme', 'Globex', 'Initech', 'Umbrella', 'Hooli', 'Stark', 'Wayne', 'Wonka',
              'Cyberdyne', 'Soylent', 'Tyrell', 'Aperture', 'Massive', 'Vandelay', 'Prestige',
              'Gringotts', 'Oceanic', 'Pied Piper', 'Dunder Mifflin', 'Monarch'])[1 + c.client_id % 20]
           || ' ' ||
       (ARRAY['Inc.', 'Labs', 'Group', 'GmbH', 'Ltd', 'Studios', 'Systems'])[1 + (c.client_id / 20) % 7],
       'https://logos.example/' || c.client_id || '.png',
       (ARRAY['Fintech', 'Retail', 'Healthcare', 'Gaming', 'Media', 'Logistics', 'Education',
              'Energy'])[1 + c.client_id % 8],
       'Client of seller ' || s.id || ' since ' || (2015 + c.client_id % 10) || '. '
           || (SELECT string_agg(md5(s.id::text || ':' || c.client_id::text || ':' || g::text), '')
               FROM generate_series(1, 100) AS g)
FROM sellers AS s
CROSS JOIN LATERAL (
    SELECT p AS position, 100000 + (s.id * 31 + p * 7919) % 5000 AS client_id
    FROM generate_series(1, CASE WHEN (s.id * 37) % 10 < 4 THEN 0 ELSE 1 + (s.id * 13) % 8 END) AS p
) AS c
WHERE s.id BETWEEN 1 AND 1000
ON CONFLICT (seller_id, client_id) DO NOTHING;
