-- The registry's own schema (created by the service before migrating).
CREATE TABLE registry.projects (
    slug        text PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE registry.api_keys (
    id              text PRIMARY KEY,
    project         text NOT NULL REFERENCES registry.projects (slug) ON DELETE CASCADE,
    name            text NOT NULL,
    -- SHA-256 of the secret: keys are 238 bits of CSPRNG output, so a fast hash is enough and
    -- lets every verification be one index lookup.
    secret_hash     bytea NOT NULL UNIQUE,
    -- First characters of the secret, to tell keys apart in a list.
    secret_prefix   text NOT NULL,
    scope           text NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    platform_admin  boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    revoked_at      timestamptz,
    last_used_at    timestamptz
);

-- Listing a project's keys, newest first, by keyset.
CREATE INDEX api_keys_project_created ON registry.api_keys (project, created_at DESC, id DESC);

CREATE TABLE registry.devices (
    project               text NOT NULL REFERENCES registry.projects (slug) ON DELETE CASCADE,
    id                    text NOT NULL,
    name                  text,
    device_type           text NOT NULL CHECK (device_type IN ('sensor', 'actuator', 'gateway')),
    device_group          text,
    tags                  text[] NOT NULL DEFAULT '{}',
    metadata              jsonb NOT NULL DEFAULT '{}',
    heartbeat_interval_s  integer,
    token_hash            bytea NOT NULL UNIQUE,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project, id)
);

-- Listing devices by type, keyset on id.
CREATE INDEX devices_project_type ON registry.devices (project, device_type, id);
