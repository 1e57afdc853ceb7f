-- A webhook is disabled after failing for a time, not after a count of failed deliveries
-- (docs/decisions/2026-12-04-retention-and-disabled-webhooks.md): the time of the first failed
-- attempt since the last success, cleared by any success. `consecutive_failures` is no longer
-- read; it stays so that an older release running during a rolling upgrade still works.
ALTER TABLE webhooks.webhooks ADD COLUMN failing_since timestamptz;

-- The indexes below block writes to their table while they build: with a large queue, build
-- them CONCURRENTLY by hand under the same names before upgrading, and these do nothing.

-- Retention deletes finished deliveries oldest first; pending rows are not in this index, so
-- a long queue costs the batches nothing.
CREATE INDEX IF NOT EXISTS deliveries_finished ON webhooks.deliveries (completed_at) WHERE status <> 'pending';
-- An event goes only when no delivery refers to it any more.
CREATE INDEX IF NOT EXISTS deliveries_by_event ON webhooks.deliveries (event_id);
-- Events are swept oldest first, keyset on (created_at, id).
CREATE INDEX IF NOT EXISTS events_created ON webhooks.events (created_at, id);
