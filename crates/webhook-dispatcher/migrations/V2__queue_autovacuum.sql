-- The deliveries table is a queue: every row is updated two or three times within seconds.
-- Vacuum and analyze it after 1 % of it changed (the default waits for 20 %), so dead index
-- entries do not pile up in front of the claim and the planner knows how many rows are due.
ALTER TABLE webhooks.deliveries SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.01,
    autovacuum_vacuum_cost_delay = 0
);
ALTER TABLE webhooks.attempts SET (autovacuum_analyze_scale_factor = 0.02);
