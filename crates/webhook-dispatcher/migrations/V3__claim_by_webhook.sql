-- The claim walks the webhooks that have pending deliveries (a skip scan of this index) and
-- takes each one's oldest due rows up to its free slots. `deliveries_due`, one time order for
-- all webhooks, made a claim walk every due row of a webhook at its concurrency cap: with a
-- backlog of 18,000 rows on one busy webhook, each claim cost milliseconds and deliveries
-- fell behind for good. (docs/decisions/2026-11-22-claim-by-webhook.md)
CREATE INDEX deliveries_pending_by_webhook
    ON webhooks.deliveries (webhook_id, next_attempt_at) WHERE status = 'pending';
DROP INDEX webhooks.deliveries_due;
