-- The W3C traceparent of the bus message an event came from: each attempt of its deliveries,
-- made later by whichever dispatcher claims them, joins that trace (and sends it on).
ALTER TABLE webhooks.events ADD COLUMN traceparent text;
