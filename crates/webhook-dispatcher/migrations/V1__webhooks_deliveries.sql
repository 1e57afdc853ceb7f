CREATE TABLE webhooks.webhooks (
    id                          text PRIMARY KEY,
    project                     text NOT NULL,
    name                        text,
    url                         text NOT NULL,
    events                      text[] NOT NULL,
    device_ids                  text[] NOT NULL DEFAULT '{}',
    device_group                text,
    headers                     jsonb NOT NULL DEFAULT '{}',
    metadata                    jsonb NOT NULL DEFAULT '{}',
    -- Kept in clear: signing needs it. Never logged, only returned by GET …/secret.
    secret                      text NOT NULL,
    -- During a rotation both secrets sign until this one expires.
    previous_secret             text,
    previous_secret_expires_at  timestamptz,
    enabled                     boolean NOT NULL DEFAULT true,
    disabled_reason             text,
    disabled_at                 timestamptz,
    -- Deliveries that ended failed in a row; reset by any success.
    consecutive_failures        integer NOT NULL DEFAULT 0,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhooks_project ON webhooks.webhooks (project, created_at DESC, id DESC);

-- One row per event that at least one webhook wanted; the body is exactly what is POSTed.
CREATE TABLE webhooks.events (
    id          text PRIMARY KEY,
    project     text NOT NULL,
    event_type  text NOT NULL,
    device_id   text,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The durable queue: a pending row with next_attempt_at is a promise to try again. Workers
-- claim due rows with FOR UPDATE SKIP LOCKED and a lease (locked_until), so two dispatchers
-- never take the same row and a killed one's lease simply runs out.
CREATE TABLE webhooks.deliveries (
    id               text PRIMARY KEY,
    webhook_id       text NOT NULL REFERENCES webhooks.webhooks (id) ON DELETE CASCADE,
    project          text NOT NULL,
    event_id         text NOT NULL REFERENCES webhooks.events (id),
    event_type       text NOT NULL,
    status           text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    locked_until     timestamptz,
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz,
    UNIQUE (webhook_id, event_id)
);
-- The claim query: due pending rows in time order.
CREATE INDEX deliveries_due ON webhooks.deliveries (next_attempt_at) WHERE status = 'pending';
-- A webhook's delivery log, newest first.
CREATE INDEX deliveries_by_webhook ON webhooks.deliveries (webhook_id, created_at DESC, id DESC);

CREATE TABLE webhooks.attempts (
    id                bigserial PRIMARY KEY,
    delivery_id       text NOT NULL REFERENCES webhooks.deliveries (id) ON DELETE CASCADE,
    attempted_at      timestamptz NOT NULL,
    status_code       integer,
    latency_ms        integer NOT NULL,
    error             text,
    response_snippet  text
);
CREATE INDEX attempts_by_delivery ON webhooks.attempts (delivery_id, id);
