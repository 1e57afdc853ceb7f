-- A claim rewrites a row's lease (locked_until, attempts, updated_at), which no index covers.
-- With room left on the page, Postgres keeps the new version there and adds no index entries
-- (a HOT update); on full pages each lease wrote four. New pages keep 30 % free.
ALTER TABLE webhooks.deliveries SET (fillfactor = 70);
