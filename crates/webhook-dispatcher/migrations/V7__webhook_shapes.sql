-- What a receiver asks of the shape of its deliveries: batches, per-device order, filters
-- and the body's format (docs/decisions/2026-12-05-webhook-shapes.md), one JSON document
-- validated by the API. Absent keys are the defaults, so '{}' is today's behaviour.
ALTER TABLE webhooks.webhooks ADD COLUMN options jsonb NOT NULL DEFAULT '{}';

-- Per-device order: a delivery knows its device, and its place in the order deliveries were
-- stored. No default on ADD COLUMN (that would rewrite a large queue); new rows take the
-- sequence, rows from before order by creation time as they always did.
ALTER TABLE webhooks.deliveries ADD COLUMN device_id text;
ALTER TABLE webhooks.deliveries ADD COLUMN seq bigint;
CREATE SEQUENCE webhooks.deliveries_seq;
ALTER TABLE webhooks.deliveries ALTER COLUMN seq SET DEFAULT nextval('webhooks.deliveries_seq');
-- The head of each device's line, for ordered webhooks' claims (pending rows only).
CREATE INDEX IF NOT EXISTS deliveries_device_line ON webhooks.deliveries (webhook_id, device_id, seq)
    WHERE status = 'pending';

-- Attempts of a batch share its id (the `webhook-id` the receiver saw).
ALTER TABLE webhooks.attempts ADD COLUMN batch_id text;
