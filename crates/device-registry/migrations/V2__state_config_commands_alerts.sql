-- Presence, configuration, commands, alert rules and the outbox that turns their changes into
-- bus messages.

ALTER TABLE registry.devices
    ADD COLUMN status            text NOT NULL DEFAULT 'unknown'
                                 CHECK (status IN ('unknown', 'online', 'offline')),
    ADD COLUMN last_seen         timestamptz,
    -- last_seen + 3 heartbeat intervals, kept with last_seen: the sweeper's one index range.
    ADD COLUMN offline_after     timestamptz,
    ADD COLUMN status_changed_at timestamptz,
    ADD COLUMN config            jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN config_version    bigint NOT NULL DEFAULT 0,
    ADD COLUMN config_updated_at timestamptz;

-- Listing filters: by group (keyset on id), by tag (GIN); status and type filter on top.
CREATE INDEX devices_project_group ON registry.devices (project, device_group, id);
CREATE INDEX devices_tags ON registry.devices USING gin (tags);
-- The offline sweep reads only online devices past their deadline.
CREATE INDEX devices_offline_after ON registry.devices (offline_after) WHERE status = 'online';

-- Every configuration version, for audit and for "what did the device have at version N".
CREATE TABLE registry.device_configs (
    project     text NOT NULL,
    device_id   text NOT NULL,
    version     bigint NOT NULL,
    config      jsonb NOT NULL,
    changed_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project, device_id, version),
    FOREIGN KEY (project, device_id) REFERENCES registry.devices (project, id) ON DELETE CASCADE
);

CREATE TABLE registry.commands (
    id              text PRIMARY KEY,
    project         text NOT NULL,
    device_id       text NOT NULL,
    name            text NOT NULL,
    params          jsonb NOT NULL DEFAULT '{}',
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'acked', 'failed', 'expired')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    delivered_at    timestamptz,
    -- Set when an HTTP device fetched it: each transport hands a command over once.
    http_fetched_at timestamptz,
    acked_at        timestamptz,
    detail          text,
    FOREIGN KEY (project, device_id) REFERENCES registry.devices (project, id) ON DELETE CASCADE
);

-- A device's commands, newest first (listing), and its live ones (HTTP fetch).
CREATE INDEX commands_device ON registry.commands (project, device_id, created_at DESC, id DESC);
-- The expiry sweep.
CREATE INDEX commands_live_expiry ON registry.commands (expires_at)
    WHERE status IN ('pending', 'delivered');

CREATE TABLE registry.alert_rules (
    id               text PRIMARY KEY,
    project          text NOT NULL REFERENCES registry.projects (slug) ON DELETE CASCADE,
    name             text NOT NULL,
    device_id        text,
    device_group     text,
    metric           text NOT NULL,
    op               text NOT NULL CHECK (op IN ('gt', 'gte', 'lt', 'lte', 'eq', 'ne')),
    threshold        double precision NOT NULL,
    clear_threshold  double precision,
    for_s            integer NOT NULL DEFAULT 0,
    severity         text NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    enabled          boolean NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((device_id IS NULL) <> (device_group IS NULL))
);

-- Listing by keyset; evaluation looks rules up by metric.
CREATE INDEX alert_rules_project ON registry.alert_rules (project, id);
CREATE INDEX alert_rules_metric ON registry.alert_rules (project, metric) WHERE enabled;

-- Where each rule stands for each device it watches.
CREATE TABLE registry.alert_states (
    rule_id        text NOT NULL REFERENCES registry.alert_rules (id) ON DELETE CASCADE,
    project        text NOT NULL,
    device_id      text NOT NULL,
    state          text NOT NULL CHECK (state IN ('ok', 'pending', 'firing')),
    pending_since  timestamptz,
    -- The newest reading evaluated: older ones (redelivered, out of order) are skipped.
    last_ts        timestamptz,
    last_value     double precision,
    changed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rule_id, device_id),
    FOREIGN KEY (project, device_id) REFERENCES registry.devices (project, id) ON DELETE CASCADE
);

-- Bus messages written in the same transaction as the change they announce, published by a
-- relay and deleted once JetStream acknowledged them (Nats-Msg-Id dedupes a relay that died
-- between the ack and the delete).
CREATE TABLE registry.outbox (
    seq         bigserial PRIMARY KEY,
    subject     text NOT NULL,
    msg_id      text NOT NULL,
    payload     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
